#!/usr/bin/env bash
# A batched GPU session (device machines start slowly and are lent briefly), each step teed under $OUT.
# Run from the repo root, with the groups of steps to run (default: all but sweep):
#     OUT=/some/dir bash scripts/gpu_session.sh [build] [tests] [bench] [sweep]
#   build  versions, and the CUDA C++ extension built in place for this GPU
#   tests  the gpu-marked tests (Triton and CUDA parity, compute-sanitizer), then the tests that need
#          torchvision/timm (which the GPU machines have and the CPU ones cannot install)
#   bench  the benchmark suite at MUSE shapes (op level, fused loss, model level)
#   sweep  the resolution sweep (N 64…4096, D 64/128)
# One device call is limited to 10 minutes: split the groups over several calls (the extension built
# by "build" stays in the working tree of a warm machine). A failing step is recorded and the next
# one still runs.
set -uo pipefail
out=${OUT:-gpu_session_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
groups=${*:-build tests bench}

step() {
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 5 "$out/$name.log" | tee -a "$out/summary.txt"
}

wants() { [[ " $groups " == *" $1 "* ]]; }

if wants build; then
    step versions bash -c 'nvidia-smi; git rev-parse HEAD; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
    step build_cuda bash -c 'MAX_JOBS=16 MUSE_KERNELS_CUDA_ARCHS=$(python -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") python setup.py build_ext --inplace'
fi
if wants tests; then
    step gpu_tests python -m pytest -q -m gpu -p no:cacheprovider -rs -n "${PYTEST_WORKERS:-4}"
    step optional_dep_tests python -m pytest -q -p no:cacheprovider -rs tests/muse/test_losses.py tests/muse/eval/test_recon_metrics.py
fi
if wants bench; then
    step bench_muse python -m benchmarks.run --shapes muse --out "$out/bench_muse"
fi
if wants sweep; then
    step bench_sweep python -m benchmarks.run --shapes sweep --out "$out/bench_sweep"
fi
