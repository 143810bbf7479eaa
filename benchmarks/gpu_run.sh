#!/usr/bin/env bash
# One device call: install wina-fx offline, run the CUDA tests, then the decode benchmark.
#   bash benchmarks/gpu_run.sh [decode.py arguments]
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -x -p no:cacheprovider tests/test_backend.py -k cuda 2>&1 | tail -5
python3 benchmarks/decode.py "$@" 2>&1 | grep -v "^\s*$" | tail -60
