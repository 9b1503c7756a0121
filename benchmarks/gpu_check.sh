#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA GPU (from the repository root):
#   bash benchmarks/gpu_check.sh [QUICK]
# 1. the CUDA tests (tests/test_cuda_graph.py: the captured step trains like the eager one, GPU
#    results equal CPU results, sparse products on CUDA), 2. the GPU benchmark against scvi-tools
#    (sim100k, 3 epochs, 2 repeats), 3. ours with the CUDA graph off, 4. the whole test suite.
# Packages missing on the machine travel as wheels in .whl/ (see .library/device/README.md).
# Logs go to $OUT (default /tmp/gpu_check). QUICK=1 stops after step 2; NO_EAGER=1 skips step 3;
# step 4 runs with FULL=1.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | grep -v "^WARNING\|^ERROR: pip's dependency" | tail -3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pyro, anndata, scvi; print('torch', torch.__version__, 'pyro', pyro.__version__, \
'anndata', anndata.__version__, 'scvi', scvi.__version__, torch.cuda.get_device_name())" 2>&1 | tail -2
echo "== 1. CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda_graph.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -30
echo "== 2. GPU benchmark"
timeout 300 python3 benchmarks/benchmark_train.py --dataset sim100k --epochs 3 --repeats 2 --accelerator gpu \
    2>&1 | tee "$OUT/bench_gpu.log" | grep -v "^repeat"
grep "^repeat" "$OUT/bench_gpu.log" | cut -c1-400
[ -n "${QUICK:-}" ] && exit 0
if [ -z "${NO_EAGER:-}" ]; then
echo "== 3. ours, CUDA graph off"
timeout 100 python3 benchmarks/benchmark_train.py --dataset sim100k --epochs 3 --repeats 1 --accelerator gpu \
    --libraries ours --cuda-graphs off 2>&1 | tee "$OUT/bench_gpu_eager.log" | grep -v "^repeat"
fi
[ -z "${FULL:-}" ] && exit 0
echo "== 4. the whole suite on the GPU machine (xdist if its wheel travelled)"
NPROC=""; python3 -c "import xdist" 2>/dev/null && NPROC="-n 8"
timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=line $NPROC tests 2>&1 \
    | tee "$OUT/pytest_all.log" | tail -25
