"""The CUDA C++ backend: every .cu compiles for sm_80 and sm_90 (CPU, with nvcc), the register-resident
fp16/bf16 kernels do not spill (ptxas -v), clear errors without a GPU, and on a GPU the parity grid
against the fp64 reference and the Triton backend, and a compute-sanitizer memcheck run."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from functools import cache
from pathlib import Path

import pytest
import torch

from muse_kernels import synergistic_attention
from muse_kernels.ops.synergistic_attention_cuda import CSRC, load_extension
from test_synergistic_attention import DTYPES, MODES, SEQ_LENS, check_parity
from test_topology_kl_loss import KL_CASES, KL_IDS, check_fused_attention_and_loss, check_loss_parity

NVCC = shutil.which("nvcc")
CUDA_FILES = sorted(p.name for p in CSRC.glob("*.cu"))


def test_sources_are_torch_free():
    assert CUDA_FILES == ["synergistic_attention_bwd.cu", "synergistic_attention_fwd.cu"]
    for path in [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        assert "torch" not in "".join(line for line in path.read_text().splitlines(True)
                                      if line.startswith("#include")), path.name


@cache
def _nvcc_build(source: str, arch: str) -> tuple[subprocess.CompletedProcess, int]:
    """One nvcc build per (source, arch) and test session, with ptxas' resource report (-Xptxas -v)."""
    with tempfile.TemporaryDirectory() as folder:
        obj = Path(folder) / "out.o"
        # -Werror: a warning in a kernel is a defect here; the static_asserts check the shared-memory budget
        # of every (dtype, head dim) configuration.
        cmd = [NVCC, "-std=c++17", "-O3", "-c", "-Werror", "all-warnings", "-Xptxas", "-v", "-gencode",
               f"arch=compute_{arch},code=sm_{arch}", str(CSRC / source), "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        return result, obj.stat().st_size if obj.exists() else 0


def ptxas_resources(report: str) -> dict[str, dict[str, int]]:
    """Per compiled kernel (mangled name): registers, stack frame and spill bytes from ptxas -v."""
    kernels = {}
    for chunk in report.split("Compiling entry function '")[1:]:
        name = chunk.split("'", 1)[0]
        numbers = {key: int(match.group(1)) for key, pattern in (
            ("registers", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
            ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads"))
            if (match := re.search(pattern, chunk))}
        kernels[name] = numbers
    return kernels


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ("80", "90"))
@pytest.mark.parametrize("source", CUDA_FILES)
def test_cuda_source_compiles(source, arch):
    result, size = _nvcc_build(source, arch)
    assert result.returncode == 0, result.stderr[-4000:]
    assert size > 0


# The register-resident fp16/bf16 kernels keep Q·Kᵀ and their accumulators in registers: a spill would
# move them to local memory (slower than the shared memory the WMMA kernels stage through), defeating
# the design, so the budget is 0 bytes of spills and of stack for every (kernel, input type, head dim)
# variant. dK/dV is register-resident at D = 64 only (at D = 128 it spilled and stays on shared memory).
MMA_SPILL_BUDGET = 0
MMA_KERNELS = {"synergistic_attention_fwd.cu": {"forward": (64, 128), "maps": (64, 128)},
               "synergistic_attention_bwd.cu": {"dq": (64, 128), "dkdv": (64,)}}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ("80", "90"))
@pytest.mark.parametrize("source", sorted(MMA_KERNELS))
def test_register_resident_kernels_do_not_spill(source, arch):
    result, _ = _nvcc_build(source, arch)
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = ptxas_resources(result.stdout + result.stderr)
    variants = [f"mma_{kernel}_kernelI{t}Li{d}E" for kernel, dims in MMA_KERNELS[source].items()
                for t in ("6__half", "13__nv_bfloat16") for d in dims]
    for variant in variants:
        found = {name: numbers for name, numbers in kernels.items() if variant in name}
        assert len(found) == 1, f"ptxas reported {len(found)} kernels matching {variant}: {sorted(kernels)}"
        (name, numbers), = found.items()
        assert {"registers", "stack", "spill_stores", "spill_loads"} <= numbers.keys(), (name, numbers)
        spilled = numbers["spill_stores"] + numbers["spill_loads"] + numbers["stack"]
        assert spilled <= MMA_SPILL_BUDGET, f"sm_{arch} {variant}: {numbers}"


def test_ptxas_report_parsing_sees_spills():
    report = """ptxas info    : Compiling entry function '_Z1av' for 'sm_80'
ptxas info    : Function properties for _Z1av
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1bv' for 'sm_80'
ptxas info    : Function properties for _Z1bv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 368 bytes cmem[0]
"""
    assert ptxas_resources(report) == {
        "_Z1av": {"registers": 255, "stack": 24, "spill_stores": 16, "spill_loads": 8},
        "_Z1bv": {"registers": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0},
    }


def test_cuda_ops_are_registered():
    assert hasattr(torch.ops.muse_kernels, "synergistic_attention_cuda_fwd")
    assert hasattr(torch.ops.muse_kernels, "synergistic_attention_cuda_bwd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_the_cuda_backend_says_so():
    with pytest.raises(RuntimeError, match="backend='cuda' needs a CUDA GPU"):
        load_extension()
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="backend='cuda' .* needs CUDA tensors"):
        synergistic_attention(q, q, q, backend="cuda")


# ------------------------------------------------------------------------------------------------ GPU

CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shield", (True, False), ids=("shield", "noshield"))
@pytest.mark.parametrize("return_attn", MODES, ids=str)
def test_cuda_parity_grid_gpu(seq, dtype, shield, return_attn):
    check_parity((2, 3, seq, 64), dtype, CUDA, return_attn=return_attn, shield=shield, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", (64, 128))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq,layout,return_attn,shield,attn_dtype", [
    (17, "bnhd", "per_head", False, torch.float32),
    (100, "sliced", "head_mean", True, torch.bfloat16),
    (67, "bnhd", "head_mean", False, torch.bfloat16),
    (257, "contiguous", "per_head", True, torch.bfloat16),
])
def test_cuda_parity_head_dims_and_layouts_gpu(dim, dtype, seq, layout, return_attn, shield, attn_dtype):
    check_parity((2, 2, seq, dim), dtype, CUDA, return_attn=return_attn, shield=shield, layout=layout,
                 attn_dtype=attn_dtype, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", (64, 256, 1000))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shield,return_attn", list(itertools.product((True, False), MODES)))
def test_cuda_against_triton_at_muse_shapes_gpu(seq, dtype, shield, return_attn):
    # The Triton backend's error is the yardstick: the two backends are equally accurate.
    check_parity((8, 8, seq, 64), dtype, CUDA, return_attn=return_attn, shield=shield, layout="bnhd",
                 backend="cuda", baseline="triton")


@pytest.mark.gpu
def test_cuda_backend_rejects_unsupported_head_dims_gpu():
    q = torch.randn(1, 2, 8, 32, device=CUDA)
    with pytest.raises(ValueError, match=r"head_dim .* \(64, 128\) for backend='cuda'"):
        synergistic_attention(q, q, q, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", (1, 37, 100, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_cuda_topology_loss_parity_gpu(seq, dtype, reduction, shared):
    check_loss_parity((2, 3, seq, 64), dtype, CUDA, reduction, shared, layout="bnhd", backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", (1, 17, 100))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_cuda_fused_attention_and_loss_gpu(seq, dtype, reduction, shared):
    check_fused_attention_and_loss((2, 3, seq, 64), dtype, CUDA, reduction, shared, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not installed")
def test_compute_sanitizer_memcheck_gpu(tmp_path):
    load_extension()  # built (or found) before the sanitizer run, which then only loads it
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import torch
        from muse_kernels import synergistic_attention
        for dtype, dim, seq in ((torch.bfloat16, 64, 37), (torch.float32, 128, 33), (torch.float16, 128, 70)):
            q, k, v = (torch.randn(2, 3, seq, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            for mode, shield in (("per_head", False), ("head_mean", True)):
                out, attn = synergistic_attention(q, k, v, return_attn=mode, shield=shield, backend="cuda")
                torch.autograd.grad((out, attn), (q, k, v), (torch.randn_like(out), torch.randn_like(attn)))
        torch.cuda.synchronize()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", sys.executable,
                             str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout
