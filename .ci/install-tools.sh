#!/usr/bin/env bash
# Tools the test suite drives for real. Idempotent; safe to run on a developer machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "cargo is required (rustup toolchain)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
