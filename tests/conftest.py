"""Test setup: Triton interpreter on GPU-less machines, its bf16 corrections, a device fixture."""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# pytest-xdist runs one worker per core: torch's default of one intra-op thread per core in each worker
# oversubscribes the machine, and the tests' small tensors then spend their time in spinning thread
# barriers (a tiny training step measured 3× slower on 2 cores).
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
if not HAS_GPU:
    # Must be set before triton.jit decorates the kernels, i.e. before muse_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter's two bf16 defects (tl.dot multiplies raw bit patterns; fp32 → bf16 truncates)
    # are corrected by the package itself whenever the interpreter runs (muse_kernels.interpreter_fixes,
    # tested without this harness in tests/ops/test_interpreter_bf16.py); applied here before any test
    # so that every kernel test sees the hardware's numbers. The kernels are not bent around them.
    from muse_kernels.interpreter_fixes import apply_interpreter_bf16_fixes

    apply_interpreter_bf16_fixes()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Kernel tests run on CUDA when present, else on CPU tensors through the Triton interpreter."""
    return torch.device("cuda" if HAS_GPU else "cpu")
