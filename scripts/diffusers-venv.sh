#!/usr/bin/env bash
# A throwaway Python environment with PyTorch and diffusers for the benchmark
# comparison and for regenerating reference fixtures (about 6 GB: PyPI's
# PyTorch wheel is the CUDA build). Not needed by the tests.
#   bash scripts/diffusers-venv.sh [DIR]       (default /tmp/modelcache-diffusers)
set -euo pipefail
dir=${1:-/tmp/modelcache-diffusers}
python3 -m venv "$dir"
"$dir/bin/pip" install -q --disable-pip-version-check torch 'diffusers==0.42.1' 'transformers==5.*' safetensors pillow
echo "MODELCACHE_DIFFUSERS_PYTHON=$dir/bin/python"
