#!/usr/bin/env bash
# One batched GPU session (device machines start slowly and are lent briefly): versions, the CUDA
# extension build, the gpu-marked tests (CUDA backend parity and compute-sanitizer included), then
# the benchmark suite, each step teed under $OUT. Run from the repo root:
#     OUT=/some/dir bash scripts/gpu_session.sh [quick]
# "quick" benchmarks only the MUSE shapes. A failing step is recorded and the next one still runs.
set -uo pipefail
out=${OUT:-gpu_session_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 5 "$out/$name.log" | tee -a "$out/summary.txt"
}

step versions bash -c 'nvidia-smi; git rev-parse HEAD; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
# The CUDA C++ backend, built in place for this GPU only (the tests and benchmarks then import it).
step build_cuda bash -c 'MAX_JOBS=16 MUSE_KERNELS_CUDA_ARCHS=$(python -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") python setup.py build_ext --inplace'
step gpu_tests python -m pytest -q -m gpu -p no:cacheprovider -rs
# Tests that need torchvision/timm, which the GPU machines have and the CPU ones cannot install.
step optional_dep_tests python -m pytest -q -p no:cacheprovider -rs tests/muse/test_losses.py tests/muse/eval/test_recon_metrics.py
step bench_muse python -m benchmarks.run --shapes muse --out "$out/bench_muse"
if [ "${1:-}" != "quick" ]; then
    step bench_sweep python -m benchmarks.run --shapes sweep --out "$out/bench_sweep"
fi
