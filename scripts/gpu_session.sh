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
#   issue19  every row of issue 19's targets table in one call (it builds the extension itself):
#            $OUT/issue19_targets.md, and issue19/ in the archive (results.json, profile.json, source.json,
#            targets.md, targets.json). Set MUSE_SOURCE_COMMIT to the commit the tree was sent from: the
#            device's own git metadata is the session start's.
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

# Every issue-19 step runs under a time limit so that one slow step leaves the others their time.
limited() { if wants issue19; then timeout -s TERM -k 10 "$@"; else "${@:2}"; fi; }

# What was sent, before anything is built into the tree: the caller's commit and a digest of the
# sources that decide the timings (check it at that commit: the same pipeline in a clean checkout).
# Files the device's older index lists but the tree no longer has are skipped, as there.
tree_digest() {
    git ls-files -co --exclude-standard -- muse_kernels csrc benchmarks setup.py ':!benchmarks/results' \
        | LC_ALL=C sort | xargs -d '\n' sha256sum 2>/dev/null | sha256sum | cut -d' ' -f1
}
if wants issue19; then
    mkdir -p "$work/issue19"
    printf '{"source_commit": "%s", "device_head": "%s", "tree_sha256": "%s"}\n' "${MUSE_SOURCE_COMMIT:-unknown}" \
        "$(git rev-parse HEAD 2>/dev/null)" "$(tree_digest)" > "$work/issue19/source.json"
fi

if wants build || wants issue19; then
    step versions bash -c 'nvidia-smi; git rev-parse HEAD; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
    step build_cuda limited 150 bash -c 'MAX_JOBS=16 MUSE_KERNELS_CUDA_ARCHS=$(python -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") python setup.py build_ext --inplace'
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
if wants issue19; then
    # Estimated on the H100 (benchmarks/results/nvidia-h100-80gb-hbm3): extension build ~1 min (58 s in
    # run 1; three .cu files: three nvcc jobs at most, however many cores); bench: 2 N × (4 variants × 2 modes
    # × 6 providers + 4 × 2 × 4) = 160 cases (8 skipped), at the graphs run's 0.26 s a case (144 cases
    # in 37 s, repeat/summary.txt) ~45 s, plus ~1 min of Triton compiles on a fresh machine's empty
    # cache; profile: 88 cases (3 warm-up + 20 timed + 20 profiled calls each, ~0.5 s) ~50 s; the
    # interpreter starts ~10 s a step. About 4–5 minutes in all; the limits (build 150 s, bench 180 s,
    # profile 100 s, targets 30 s, each + 10 s to die) cap it at about 8.5 minutes, inside a call's 10.
    i19="$work/issue19"
    cuda=cuda
    if ! python -c "import muse_kernels._C" > "$work/issue19_extension.log" 2>&1; then
        # A missing build would be retried (as a JIT build) by every cuda case: leave the provider out.
        cuda=
        echo "=== issue19: muse_kernels._C is not importable, provider cuda left out" | tee -a "$work/summary.txt"
    fi
    step issue19_bench limited 180 python -m benchmarks.run --shapes muse --cuda-graphs \
        --ops synergistic_attention topology_kl_loss --modes fwd fwd+bwd \
        --providers eager sdpa_flash sdpa_cudnn sdpa_efficient ours $cuda --out "$i19"
    step issue19_profile limited 100 python -m benchmarks.profile_kernels --ops synergistic_attention topology_kl_loss \
        --modes fwd fwd+bwd --providers sdpa_flash ours $cuda --out "$i19"
    step issue19_targets limited 30 python -m benchmarks.targets "$i19" --write
    if [[ -f "$i19/targets.md" ]]; then
        cp "$i19/targets.md" "$out/issue19_targets.md"
    else
        echo "=== issue19: no targets.md written" | tee -a "$work/summary.txt"
        exit 1
    fi
fi
