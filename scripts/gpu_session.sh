#!/usr/bin/env bash
# A batched GPU session (device machines start slowly and are lent briefly). Run from the repo root,
# with the groups of steps to run (default: build tests bench):
#     OUT=/some/dir bash scripts/gpu_session.sh [build] [tests] [bench] [graphs] [profile] [sweep]
#   build    versions, and the CUDA C++ extension built in place for this GPU
#   tests    the gpu-marked tests (Triton and CUDA parity, compute-sanitizer), then the tests that need
#            torchvision/timm (which the GPU machines have and the CPU ones cannot install)
#   bench    the benchmark suite at MUSE shapes, wall time of eager calls (op level, fused loss, model)
#   graphs   the same ops and the model-level block/connector as CUDA graph replays (device time)
#   profile  wall time vs kernel time per case, and the Python functions costing host time
#   sweep    the resolution sweep (N 64…4096, D 64/128), fwd+bwd, the main variants
#   transformers  whole transformers models on the "muse" attention vs eager maps and SDPA (issue 21)
# One device call is limited to 10 minutes: split the groups over several calls (the extension built
# by "build" stays in the working tree of a warm machine). A failing step is recorded and the next
# one still runs. Everything lands in $OUT/gpu_session.tgz (the device returns at most 8 files) and
# the step summary in $OUT/summary.txt, also when the call is cut short.
set -uo pipefail
out=${OUT:-gpu_session_out}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
groups=${*:-build tests bench}

finish() {
    cp "$work/summary.txt" "$out/summary.txt" 2>/dev/null
    tar czf "$out/gpu_session.tgz" -C "$work" .
}
trap finish EXIT
trap 'exit 143' TERM

step() {
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$work/summary.txt"
    local start=$SECONDS
    "$@" > "$work/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$work/summary.txt"
    tail -n 5 "$work/$name.log" | tee -a "$work/summary.txt"
}

wants() { [[ " $groups " == *" $1 "* ]]; }

if wants build; then
    step versions bash -c 'nvidia-smi; git rev-parse HEAD; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
    step build_cuda bash -c 'MAX_JOBS=16 MUSE_KERNELS_CUDA_ARCHS=$(python -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") python setup.py build_ext --inplace'
fi
if wants tests; then
    # Four workers: eight ran the GPU out of memory at N = 1024.
    step gpu_tests python -m pytest -q -m gpu -p no:cacheprovider -rs -n "${PYTEST_WORKERS:-4}"
    step optional_dep_tests python -m pytest -q -p no:cacheprovider -rs tests/muse/test_losses.py tests/muse/eval/test_recon_metrics.py
fi
if wants bench; then
    step bench_muse python -m benchmarks.run --shapes muse --out "$work/muse"
fi
if wants graphs; then
    step bench_graphs python -m benchmarks.run --shapes muse --cuda-graphs --ops synergistic_attention topology_kl_loss \
        --providers eager sdpa_flash sdpa_cudnn ours cuda --out "$work/muse-cuda-graphs"
    step bench_graphs_model python -m benchmarks.run --shapes muse --cuda-graphs --ops model --variants block connector \
        --out "$work/model-cuda-graphs"
fi
if wants profile; then
    step profile python -m benchmarks.profile_kernels --providers sdpa_flash ours cuda --out "$work/profile"
fi
if wants sweep; then
    step bench_sweep python -m benchmarks.run --shapes sweep --ops synergistic_attention topology_kl_loss \
        --providers eager sdpa_flash ours --modes fwd+bwd --variants no_maps per_head_bf16 attn+kl_per_head \
        --out "$work/sweep"
fi
if wants transformers; then
    step bench_transformers python -m benchmarks.bench_transformers --out "$work/transformers"
fi
