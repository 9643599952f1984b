"""The CUDA backend's kernels and launchers, run on the CPU through the emulation harness in
``cuda_emulation/`` (one host thread per CUDA thread, barriers for __syncthreads/__syncwarp, WMMA
fragments as whole tiles), against the fp64 reference with the FlashAttention rule.

This checks what a GPU-less machine can check of csrc/: indexing, masking, tiling, shared-memory
carving, barrier structure and the host dispatch over every (dtype, head dim) configuration. Tensor-core
numerics, fragment layouts and the memory model need a GPU (test_synergistic_attention_cuda.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch

from muse_kernels.ops.synergistic_attention import LOG2E, new_output_like, register_attention_ops
from muse_kernels.ops.synergistic_attention_cuda import CSRC
from muse_kernels.ops.topology_kl_loss import register_topology_kl_ops
from test_synergistic_attention import check_parity
from test_topology_kl_loss import KL_CASES, KL_IDS, check_loss_parity

HARNESS = Path(__file__).parent / "cuda_emulation"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", str(Path(nvcc).resolve().parents[1]) if nvcc else ""]
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None or shutil.which("g++") is None,
                                reason="the emulation needs g++ and the CUDA headers (cuda_fp16.h)")


@cache
def emulator() -> ctypes.CDLL:
    """The emulated backend as a shared library, built once per source version (cached on disk)."""
    sources = sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h"), *HARNESS.glob("*")])
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources if p.is_file())).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / "muse_cuda_emulation" / f"emulator-{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror",
               "-DMUSE_CPU_EMULATION", "-include", str(HARNESS / "cpu_shim.h"), "-I", str(CSRC), "-I", str(CUDA_INCLUDE),
               str(HARNESS / "emulator.cpp"), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
        os.replace(partial, library)
    return ctypes.CDLL(str(library))


def _ptr(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if x is None else x.data_ptr())


def _rows(x: torch.Tensor | None) -> list[int]:
    return [0, 0, 0] if x is None else [x.stride(0), x.stride(1), x.stride(2)]


def _int64s(values: list[int]):
    return (ctypes.c_int64 * len(values))(*values)


def _map_strides(x: torch.Tensor | None) -> list[int]:
    """A map's (batch, head, row, column) strides; a (B, N, N) map has head stride 0."""
    if x is None:
        return [0, 0, 0, 0]
    return [x.stride(0), 0, x.stride(1), x.stride(2)] if x.dim() == 3 else list(x.stride())


def _map_code(x: torch.Tensor | None) -> int:
    return DTYPE_CODES[torch.bfloat16] if x is not None and x.dtype == torch.bfloat16 else 0


def emulated_forward(q, k, v, scale, map_mode="none", attn_dtype=torch.float32, teacher=None):
    """What bindings.cpp's `fwd` does, with the emulated launchers: (out, attn, lse2, row_kl)."""
    bsz, heads, seq, dim = q.shape
    out = None if v is None else new_output_like(v)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32)
    row_kl = None if teacher is None else torch.empty_like(lse)
    code = DTYPE_CODES[q.dtype]
    rc = emulator().emu_forward(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(teacher), _ptr(row_kl),
                                _int64s(_rows(q) + _rows(k) + _rows(v) + _rows(out) + _map_strides(teacher)),
                                bsz, heads, seq, dim, ctypes.c_float(scale * LOG2E), code, _map_code(teacher))
    assert rc == 0, f"forward launch error {rc}"
    if map_mode == "none":
        return out, None, lse, row_kl
    head_mean = map_mode == "head_mean"
    attn = torch.empty((bsz, seq, seq) if head_mean else (bsz, heads, seq, seq), dtype=attn_dtype)
    rc = emulator().emu_maps(_ptr(q), _ptr(k), _ptr(lse), _ptr(attn), _int64s(_rows(q) + _rows(k) + _map_strides(attn)),
                             bsz, heads, seq, dim, ctypes.c_float(scale * LOG2E), code, _map_code(attn),
                             int(head_mean))
    assert rc == 0, f"maps launch error {rc}"
    return out, attn, lse, row_kl


def emulated_backward(grad_out, grad_attn, q, k, v, out, lse, scale, shield=True, teacher=None, kl_grad=None,
                      kl_scale=0.0):
    """What bindings.cpp's `bwd` does, with the emulated launchers."""
    bsz, heads, seq, dim = q.shape
    if grad_out is not None and grad_out.stride(3) != 1:
        grad_out = grad_out.contiguous()
    out_to_qk = grad_out is not None and not shield
    has_grad_attn, has_teacher = grad_attn is not None, teacher is not None
    compute_dqk, compute_dv = out_to_qk or has_grad_attn or has_teacher, grad_out is not None
    dq = torch.empty_like(q) if compute_dqk else torch.zeros_like(q)
    dk = torch.empty_like(k) if compute_dqk else torch.zeros_like(k)
    dv = None if v is None else (torch.empty_like(v) if compute_dv else torch.zeros_like(v))
    if not (compute_dqk or compute_dv):
        return dq, dk, dv
    delta = torch.empty(bsz, heads, seq, dtype=torch.float32)
    rowsum = None if teacher is None else teacher.sum(-1, dtype=torch.float32)
    rowsum_strides = [0, 0, 0] if rowsum is None else (
        [rowsum.stride(0), 0, rowsum.stride(1)] if rowsum.dim() == 2 else _rows(rowsum))
    kl = None if kl_grad is None else kl_grad.float().reshape(1).contiguous()
    tensors = (ctypes.c_void_p * 12)(*(_ptr(x).value for x in (q, k, v, out, grad_out, grad_attn, dq, dk, dv,
                                                                teacher, rowsum, kl)))
    strides = _int64s(_rows(q) + _rows(k) + _rows(v) + _rows(out) + _rows(grad_out) + _rows(dq) + _rows(dk)
                      + _rows(dv) + _map_strides(grad_attn) + _map_strides(teacher) + rowsum_strides)
    flags = (ctypes.c_int * 5)(int(out_to_qk), int(has_grad_attn), int(compute_dqk), int(compute_dv), int(has_teacher))
    head_mean = has_grad_attn and grad_attn.dim() == 3
    rc = emulator().emu_backward(tensors, _ptr(lse), _ptr(delta), strides, bsz, heads, seq, dim,
                                 ctypes.c_float(scale * LOG2E), ctypes.c_float(scale),
                                 ctypes.c_float(1.0 / heads if head_mean else 1.0), ctypes.c_float(kl_scale),
                                 DTYPE_CODES[q.dtype], _map_code(grad_attn), _map_code(teacher), flags)
    assert rc == 0, f"backward launch error {rc}"
    return dq, dk, dv


emulated_attention = register_attention_ops(
    "synergistic_attention_cuda_emulated",
    lambda q, k, v, scale, map_mode, attn_dtype: emulated_forward(q, k, v, scale, map_mode, attn_dtype)[:3],
    emulated_backward)
emulated_topology_kl = register_topology_kl_ops("topology_kl_cuda_emulated", emulated_forward, emulated_backward)
CPU = torch.device("cpu")


# Every (dtype, head dim) kernel configuration, with N = 1, a prime, N past one block and N past two.
@pytest.mark.parametrize("dim", (64, 128))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("seq", (1, 37, 100))
@pytest.mark.parametrize("return_attn,shield", [("per_head", False), ("head_mean", True), (None, False)])
def test_emulated_cuda_backend_parity(dim, dtype, seq, return_attn, shield):
    check_parity((1, 2, seq, dim), dtype, CPU, return_attn=return_attn, shield=shield, backend=emulated_attention)


@pytest.mark.parametrize("layout,attn_dtype", [("bnhd", torch.bfloat16), ("sliced", torch.float32)])
def test_emulated_cuda_backend_strided_inputs_and_map_dtypes(layout, attn_dtype):
    check_parity((2, 2, 70, 64), torch.bfloat16, CPU, return_attn="per_head", shield=True, layout=layout,
                 attn_dtype=attn_dtype, backend=emulated_attention)
    check_parity((1, 3, 45, 128), torch.float16, CPU, return_attn="head_mean", shield=False, layout=layout,
                 attn_dtype=attn_dtype, backend=emulated_attention)


def test_emulated_cuda_backend_shield_gives_exact_zeros():
    # Maps unused and shielded: only dV is computed; dQ and dK are exactly zero.
    check_parity((1, 2, 33, 64), torch.bfloat16, CPU, return_attn="per_head", shield=True, maps_used=False,
                 backend=emulated_attention)


def test_emulated_cuda_backend_many_blocks():
    # Several query and key blocks per slice in every kernel, head-mean over 3 heads.
    check_parity((1, 3, 150, 64), torch.bfloat16, CPU, return_attn="head_mean", shield=False,
                 backend=emulated_attention)


def _emulated_loss(q, k, teacher, reduction):
    return emulated_topology_kl(q, k, None, teacher, q.shape[-1] ** -0.5, reduction, 1e-8, True)[1]


# The fused topology KL: per head from the forward's running sums (no map), head mean through the
# (B, N, N) mean map, with dQ/dK from the KL term of both backward kernels.
@pytest.mark.parametrize("dim", (64, 128))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("seq", (1, 100))
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_emulated_cuda_topology_loss_parity(dim, dtype, seq, reduction, shared):
    check_loss_parity((1, 2, seq, dim), dtype, CPU, reduction, shared, layout="bnhd", backend=_emulated_loss)


@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_emulated_cuda_fused_attention_and_loss(reduction, shared):
    """Attention output and KL from one forward: dV from dO, dQ/dK from the KL alone, as the Triton op."""
    from helpers import assert_flash_rule, make_qkv, make_teacher
    from muse_kernels import synergistic_attention

    shape = (1, 3, 41, 64)
    q, k, v = make_qkv(shape, torch.bfloat16, CPU, "bnhd")
    teacher = make_teacher(1, 41, None if shared else 3, torch.bfloat16, CPU)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    def run(q, k, v, teacher, grad_out, fused):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        if fused:
            out, loss = emulated_topology_kl(q, k, v, teacher, 0.125, reduction, 1e-8, False)
        else:
            out, loss = synergistic_attention(q, k, v, teacher=teacher, kl_reduction=reduction, backend="torch",
                                              validate_teacher=False)
        total = (out * grad_out.to(out.dtype)).sum() + loss
        return (out, loss, *torch.autograd.grad(total, (q, k, v)))

    ours = run(q, k, v, teacher, grad_out, True)
    eager = run(q, k, v, teacher, grad_out, False)
    ref = run(*(x.double() for x in (q, k, v, teacher, grad_out)), False)
    for name, o, e, r in zip(("out", "loss", "dq", "dk", "dv"), ours, eager, ref):
        assert_flash_rule(name, o, e, r, torch.bfloat16)
    # The output's gradient never reaches q, k: they equal the loss-only gradients exactly.
    qo, ko = (x.detach().requires_grad_() for x in (q, k))
    alone = torch.autograd.grad(_emulated_loss(qo, ko, teacher, reduction), (qo, ko))
    assert torch.equal(ours[2], alone[0]) and torch.equal(ours[3], alone[1])


def test_emulated_cuda_kernels_have_no_data_races(tmp_path):
    """The kernels under ThreadSanitizer: every thread of a block is a host thread, so a missing
    __syncthreads/__syncwarp between a shared-memory write and another thread's read is reported."""
    binary = tmp_path / "race_driver"
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-Wno-unknown-pragmas",
           "-DMUSE_CPU_EMULATION", "-include", str(HARNESS / "cpu_shim.h"), "-I", str(CSRC), "-I", str(HARNESS),
           "-I", str(CUDA_INCLUDE), str(HARNESS / "race_driver.cpp"), "-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0 and "tsan" in built.stderr:
        pytest.skip(f"this g++ cannot build with ThreadSanitizer: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66"))
    if "FATAL: ThreadSanitizer" in run.stderr:
        pytest.skip(f"ThreadSanitizer cannot run here: {run.stderr[:300]}")
    assert run.returncode == 0 and "WARNING: ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.stdout.split() == ["forward", "0", "maps", "0", "backward", "0"] * 7


def test_emulated_cuda_backend_unaligned_rows(monkeypatch):
    """Slices one element into a buffer of odd row length (no 16-byte alignment) load element by element."""
    import test_synergistic_attention as attention_tests

    def offset_views(shape, dtype, device, layout="contiguous", seed=0):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(3, *shape[:-1], shape[-1] + 1, generator=gen).to(device=device, dtype=dtype)
        return [base[i, ..., 1:] for i in range(3)]

    q = offset_views((1, 2, 9, 64), torch.bfloat16, CPU)[0]
    assert q.data_ptr() % 16 != 0 and q.stride(2) % 8 != 0 and q.stride(3) == 1
    monkeypatch.setattr(attention_tests, "make_qkv", offset_views)
    check_parity((1, 2, 45, 64), torch.bfloat16, CPU, return_attn="per_head", shield=False, backend=emulated_attention)


@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_emulated_cuda_topology_loss_several_images(reduction, shared):
    # B = 2: the batch strides of q, k, the teacher and its row sums are all exercised.
    check_loss_parity((2, 3, 37, 64), torch.bfloat16, CPU, reduction, shared, layout="sliced",
                      backend=_emulated_loss)
