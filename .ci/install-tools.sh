#!/usr/bin/env bash
# Installs the real tools the test suite drives: promtool (Debian `prometheus`)
# and a Python virtual environment with the official `openai` client.
# Idempotent: does nothing for what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (install Rust with rustup)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
fi

if [ ! -x .ci/venv/bin/python ] || ! .ci/venv/bin/python -c 'import openai' 2>/dev/null; then
  python3 -m venv .ci/venv
  .ci/venv/bin/pip install -q --disable-pip-version-check openai==2.*
fi
echo "tools ready: $(promtool --version 2>&1 | head -1); openai $(.ci/venv/bin/python -c 'import openai; print(openai.__version__)')"
