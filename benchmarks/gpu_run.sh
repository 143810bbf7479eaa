#!/usr/bin/env bash
# One device call: install wina-fx offline, run every CUDA test, then the decode benchmark.
#   bash benchmarks/gpu_run.sh [decode.py arguments]
# The CUDA tests take about 5 minutes on an H200 (46 of them); the decode benchmark about 4
# minutes a sparsity.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# every test that needs CUDA is named for it (test_cuda_*, *_on_cuda_*), or for programmatic dependent launch
python3 -m pytest -q -p no:cacheprovider tests -k "cuda or programmatic" 2>&1 | tail -5
python3 benchmarks/decode.py "$@" 2>&1 | grep -v "^\s*$" | tail -60
