#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and driver: the GPU checks and benchmarks.
#
#   bash scripts/gpu-check.sh [BIN_DIR]       (default target/release)
#
# BIN_DIR holds modelcache-agent and modelcache-gpu-bench built by
# scripts/build-cuda.sh (possibly on another machine: no Rust toolchain or CUDA
# toolkit is needed here). The driver provides libcuda.so.1; cuBLAS, cuRAND and
# NVRTC are taken from the system or, failing that, from Python packages such
# as PyTorch's nvidia-* wheels. Run from a checkout (it uses tests/fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
for b in modelcache-agent modelcache-gpu-bench; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b (build it with scripts/build-cuda.sh)" >&2; exit 1; }
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no NVIDIA driver here" >&2; exit 1; }

# CUDA libraries inside Python packages (nvidia/*/lib), when the system has none.
libs=""
for py in python3 /usr/bin/python3; do
  command -v "$py" >/dev/null || continue
  libs=$("$py" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = set()
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "torch/lib"):
        for d in glob.glob(os.path.join(r, pat)):
            if glob.glob(os.path.join(d, "lib*.so*")):
                dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
  [ -n "$libs" ] && break
done
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd "$bin/modelcache-agent" | grep 'not found' || true)
[ -z "$missing" ] || { echo "unresolved libraries:"; echo "$missing"; exit 1; }

f=tests/fixtures/tiny-sd1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
compare() { # compare GOT.npy REF.npy BOUND LABEL
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import sys, struct
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<H", b[8:10])[0]
    data = b[10 + n:]
    return struct.unpack("<%df" % (len(data) // 4), data)
a, b = load(sys.argv[1]), load(sys.argv[2])
d = max(abs(x - y) for x, y in zip(a, b))
ok = d < float(sys.argv[3])
print(f"| {sys.argv[4]} | max abs diff {d:.2e} | < {sys.argv[3]} | {'pass' if ok else 'FAIL'} |")
sys.exit(0 if ok else 1)
PY
}
echo
echo "| check | value | bound | result |"
echo "|---|---|---|---|"
status=0
# f32 on the GPU reproduces diffusers like the CPU does. f16 rounds every
# activation to 11 bits (relative 5e-4); through the text encoder, 4 UNet steps
# with guidance 7.5 (which multiplies differences) and the VAE, 2e-2 per pixel
# (5 levels of 8-bit colour) separates rounding from a real error, which moves
# pixels by 0.1 or more.
for p in f32:1e-3 f16:2e-2; do
  prec=${p%%:*}; bound=${p##*:}
  "$bin/modelcache-agent" generate --device cuda:0 --precision "$prec" --model "$f" --prompt "a red cat" \
    --steps 4 --guidance 7.5 --size 64x64 --latents "$f/reference_latents.safetensors" --out "$out/$prec.npy" >/dev/null
  compare "$out/$prec.npy" "$f/reference_image.npy" "$bound" "tiny-sd1 parity on GPU, $prec" || status=1
done

# A node with several GPUs: one device tier per GPU. The agent serving on all
# of them spreads tiny-sd1's components over the GPUs and must return the
# same image (f32, same seed) as the agent serving on one; both GPUs must hold
# cached bytes. ONE/ALL override the device lists (e.g. ONE=cpu ALL=cpu to try
# the script's plumbing without GPUs).
one=${ONE:-cuda:0}
all=${ALL:-}
if [ -z "$all" ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then all=cuda:0,cuda:1; fi
if [ -n "$all" ]; then
  mkdir -p "$out/models" && cp -r "$f" "$out/models/tiny-sd1"
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$out"' EXIT
  port=18480
  for d in "$one" "$all"; do
    "$bin/modelcache-agent" serve --models-dir "$out/models" --state-dir "$out/state-$port" --device "$d" \
      --precision f32 --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((port + 1))" >"$out/serve-$port.log" 2>&1 &
    pids+=($!)
    port=$((port + 2))
  done
  python3 - "$one" "$all" <<'PY' || { status=1; tail -n 5 "$out"/serve-*.log; }
import json, sys, time, urllib.request
def get(url):
    return urllib.request.urlopen(url, timeout=120).read().decode()
def generate(port):
    body = json.dumps({"model": "tiny-sd1", "prompt": "a red cat", "size": "64x64", "steps": 4, "seed": 7}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=300).read())["data"][0]["b64_json"]
for port in (18480, 18482):
    for _ in range(120):
        try:
            get(f"http://127.0.0.1:{port}/readyz"); break
        except Exception:
            time.sleep(0.5)
same = generate(18480) == generate(18482)
metrics = get("http://127.0.0.1:18483/metrics")
held = [l for l in metrics.splitlines() if l.startswith("modelcache_device_cache_bytes{") and not l.endswith(" 0")]
spread = len(held) >= 2
ok = same and spread
print(f"| one device tier per GPU ({sys.argv[2]}) | {'same image as ' + sys.argv[1] if same else 'image differs from ' + sys.argv[1]}; {len(held)} devices hold components | same image, ≥ 2 devices | {'pass' if ok else 'FAIL'} |")
sys.exit(0 if ok else 1)
PY
fi
echo
"$bin/modelcache-gpu-bench" --device cuda:0 --gib 4
exit $status
