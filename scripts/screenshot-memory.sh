#!/usr/bin/env bash
# Takes a screenshot of the key memory panels after a model-switching run and
# saves it as docs/memory-panels.png (Prometheus' own graph page in headless
# Chromium: there is no Grafana server to install here).
#
#   bash scripts/screenshot-memory.sh [SECONDS]      (default 90 s of switching)
#
# Installs Debian's chromium if missing (root or sudo), builds the agent in
# release mode, serves two copies of the tiny fixture model with a RAM budget
# that holds one, alternates requests between them, lets a real Prometheus
# scrape the agent, and photographs RSS against cached bytes and the
# fragmentation ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-90}
bash .ci/install-tools.sh >/dev/null
if ! command -v chromium >/dev/null; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
cargo build --release -q -p modelcache-agent
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/models"
cp -r tests/fixtures/tiny-sd1 "$work/models/tiny-a"
cp -r tests/fixtures/tiny-sd1 "$work/models/tiny-b"

./target/release/modelcache-agent serve --models-dir "$work/models" --state-dir "$work/state" \
  --listen 127.0.0.1:18480 --metrics-listen 127.0.0.1:18490 \
  --ram-cache-bytes 24Mi --vram-cache-bytes 24Mi >"$work/agent.log" 2>&1 &
cat >"$work/prometheus.yml" <<YAML
global: {scrape_interval: 1s}
scrape_configs:
  - job_name: agent
    static_configs: [{targets: ['127.0.0.1:18490'], labels: {namespace: modelcache, node: local}}]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address=127.0.0.1:18491 --log.level=warn >/dev/null 2>&1 &
until curl -sf 127.0.0.1:18480/healthz >/dev/null; do sleep 0.2; done
until curl -sf 127.0.0.1:18491/-/ready >/dev/null; do sleep 0.2; done

echo "switching models for $secs s..."
end=$(( $(date +%s) + secs ))
while [ "$(date +%s)" -lt "$end" ]; do
  for m in tiny-a tiny-b; do
    ./target/release/modelcache-agent request --url http://127.0.0.1:18480 --model $m --size 64x64 --steps 4 >/dev/null
  done
done

q() { python3 -c 'import sys,urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
r="$(( secs / 60 + 1 ))m"
url="http://127.0.0.1:18491/classic/graph?g0.range_input=$r&g0.tab=0&g0.expr=$(q 'modelcache_process_resident_bytes or modelcache_cache_bytes{tier="ram"}')"
url+="&g1.range_input=$r&g1.tab=0&g1.expr=$(q 'label_replace(modelcache_malloc_arena_bytes, "malloc", "arena", "", "") or label_replace(modelcache_malloc_free_bytes, "malloc", "free_held", "", "") or label_replace(modelcache_malloc_mmap_bytes, "malloc", "mmapped", "", "")')"
url+="&g2.range_input=$r&g2.tab=0&g2.expr=$(q 'modelcache_malloc_fragmentation_ratio')"
mkdir -p docs
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chrome" --window-size=1400,1900 --virtual-time-budget=8000 \
  --screenshot=docs/memory-panels.png "$url" 2>/dev/null
echo "wrote docs/memory-panels.png"
