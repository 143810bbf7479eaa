#!/usr/bin/env bash
# One device call on two GPUs of one host (nvidia-h200-x2): install wina-fx offline, check the
# tensor-parallel path on two ranks, then the decode benchmark of issue 14 (writes
# decode_tp2_<gpu><suffix>.{json,png} to $OUT).
#   bash benchmarks/gpu_run_tp.sh [tensor_parallel.py --decode arguments]
# e.g. bash benchmarks/gpu_run_tp.sh --sparsities 0.5 --suffix _session20
# About 2 minutes for the checks, then 3-4 minutes for dense and as much again for each sparsity
# (calibration, two compiles a rank): one sparsity a call fits a 10-minute device call.
# NVLink multicast stays off (KINDS.md of the device tool says why).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
# the tiny model sharded over two ranks against one process (gloo, on the CPU; its last line is the error),
# then 4 layers on the two GPUs as a smoke test of the NCCL path
timeout 240 torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cpu --tiny 2>&1 | tail -1
timeout 240 torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cuda --decode --layers 4 \
    --tokens 16 --warmup 2 --sparsities 0.5 --suffix _smoke 2>&1 | grep -E "tokens/s|Error|error" | tail -4
timeout 420 torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cuda --decode "$@" 2>&1 \
    | grep -E "tokens/s|wrote|Error|error" | tail -20
