"""The CUDA C++ backend: every .cu compiles for sm_80 and sm_90 (CPU, with nvcc), clear errors
without a GPU, and on a GPU the parity grid against the fp64 reference and the Triton backend, and a
compute-sanitizer memcheck run."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap

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


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ("80", "90"))
@pytest.mark.parametrize("source", CUDA_FILES)
def test_cuda_source_compiles(source, arch, tmp_path):
    # -Werror: a warning in a kernel is a defect here; the static_asserts check the shared-memory budget
    # of every (dtype, head dim) configuration.
    cmd = [NVCC, "-std=c++17", "-O3", "-c", "-Werror", "all-warnings", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           str(CSRC / source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


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
