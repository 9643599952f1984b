"""Public functional API: argument checks and backend dispatch."""

from __future__ import annotations

import math

import torch

from muse_kernels.ops.synergistic_attention import (
    SUPPORTED_HEAD_DIMS,
    synergistic_attention_triton,
    triton_interpreting,
)
from muse_kernels.ops.synergistic_attention_cuda import CUDA_HEAD_DIMS, synergistic_attention_cuda, topology_kl_cuda
from muse_kernels.ops.topology_kl_loss import KL_REDUCTIONS, topology_kl_triton
from muse_kernels.ops.topology_kl_loss import validate_teacher as _validate_teacher
from muse_kernels.reference import (
    MAP_KINDS,
    synergistic_attention_reference,
    synergistic_attention_with_kl_reference,
    topology_kl_loss_reference,
)

BACKENDS = ("auto", "triton", "torch", "cuda")
# The compiled backends' (attention, topology KL) ops, with one contract.
KERNELS = {"triton": (synergistic_attention_triton, topology_kl_triton),
           "cuda": (synergistic_attention_cuda, topology_kl_cuda)}
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The eager backend also takes fp64, for references and gradient checks.
TORCH_BACKEND_DTYPES = (*INPUT_DTYPES, torch.float64)
ATTN_DTYPES = (torch.float32, torch.bfloat16)
TEACHER_DTYPES = (torch.float32, torch.bfloat16)  # the torch backend also takes fp64


def _autocast(*tensors: torch.Tensor):
    """Under autocast, run in its lower-precision dtype, as SDPA does: a model whose norms autocast
    to fp32 while its linears give bf16 would otherwise hand over mixed dtypes."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in tensors)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(x.shape)}")
        if x.dtype not in TORCH_BACKEND_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 (or float64 with backend='torch'), "
                            f"got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if q.shape[2] == 0:
        raise ValueError("q, k, v must have seq_len (dim 2) >= 1, got 0")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q, k, v must have batch and heads >= 1, got shape {tuple(q.shape)}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' (the compiled CUDA C++ backend) needs CUDA tensors, got device {device}; "
                         "use backend='torch' on the CPU")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); CPU tensors run only under the "
            "Triton interpreter (TRITON_INTERPRET=1 set before importing muse_kernels). Use backend='torch'."
        )
    return backend


def _check_kernel_inputs(q: torch.Tensor, backend: str, teacher: torch.Tensor | None = None) -> None:
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16 for backend={backend!r}, got {q.dtype}")
    if teacher is not None and teacher.dtype not in TEACHER_DTYPES:
        raise TypeError(f"teacher must be float32 or bfloat16 for backend={backend!r}, got {teacher.dtype}")
    head_dims = CUDA_HEAD_DIMS if backend == "cuda" else SUPPORTED_HEAD_DIMS
    if q.shape[-1] not in head_dims:
        raise ValueError(
            f"head_dim (q.shape[-1]) must be one of {head_dims} for backend={backend!r}, got "
            f"{q.shape[-1]}; backend='torch' accepts any head_dim"
        )



def _last_dim_contiguous(*tensors: torch.Tensor | None):
    return tuple(x if x is None or x.stride(-1) == 1 else x.contiguous() for x in tensors)


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_teacher(teacher: torch.Tensor, q: torch.Tensor, reduction: str, eps: float) -> None:
    if not isinstance(teacher, torch.Tensor):
        raise TypeError(f"teacher must be a torch.Tensor, got {type(teacher).__name__}")
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    bsz, heads, seq, _ = q.shape
    shared, per_head = (bsz, seq, seq), (bsz, heads, seq, seq)
    allowed = (shared,) if reduction == "head_mean" else (shared, per_head)
    if tuple(teacher.shape) not in allowed:
        expected = " or ".join(str(a) for a in allowed)
        hint = " (head_mean compares one head-averaged map per image)" if reduction == "head_mean" else ""
        raise ValueError(f"teacher must have shape {expected}{hint}, got {tuple(teacher.shape)}")
    if teacher.dtype not in (*TEACHER_DTYPES, torch.float64):
        raise TypeError(f"teacher must be float32 or bfloat16, got {teacher.dtype}")
    if teacher.device != q.device:
        raise ValueError(f"teacher must be on q's device {q.device}, got {teacher.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def topology_kl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    teacher: torch.Tensor,
    *,
    scale: float | None = None,
    reduction: str = "head_mean",
    eps: float = 1e-8,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Topology KL of the student's maps softmax(scale·q·kᵀ) against a teacher, fused: no (B, H, N, N)
    tensor is ever allocated, and the gradient goes straight into q and k.

    Args:
        q, k: (B, H, N, D), as for :func:`synergistic_attention`.
        teacher: rows summing to 1 (exact zeros allowed: 0·log 0 = 0), fp32 or bf16; (B, N, N), or
            (B, H, N, N) for ``reduction="per_head"``. It gets no gradient.
        reduction: ``"head_mean"`` (official code): s̄ = mean over heads of the maps, loss = mean over
            (batch, row) of Σ_j t·(log t − log(s̄ + eps)). ``"per_head"`` (the paper): mean over
            (batch, head, row) of KL(t ‖ A) with log A = S − LSE exactly (eps unused); a (B, N, N)
            teacher is shared by the heads.
        validate: check the teacher (finite, non-negative, rows sum to 1); costs one read of it.

    Returns:
        a 0-dim fp32 tensor (fp64 for fp64 inputs on the torch backend).
    """
    q, k = _autocast(q, k)
    _check_qkv(q, k, k)
    _check_teacher(teacher, q, reduction, eps)
    scale = _check_scale(scale, q.shape[-1])
    resolved = _resolve_backend(backend, q.device)
    if resolved == "torch":
        if validate:
            _validate_teacher(teacher)
        return topology_kl_loss_reference(q, k, teacher, scale=scale, reduction=reduction, eps=eps)
    _check_kernel_inputs(q, resolved, teacher)
    q, k, teacher = _last_dim_contiguous(q, k, teacher)
    return KERNELS[resolved][1](q, k, None, teacher, scale, reduction, eps, validate)[1]


def synergistic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_attn: str | None = None,
    attn_dtype: torch.dtype = torch.float32,
    shield: bool = True,
    backend: str = "auto",
    teacher: torch.Tensor | None = None,
    kl_reduction: str = "head_mean",
    kl_eps: float = 1e-8,
    validate_teacher: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(scale·q·kᵀ)·v that can also return its attention maps, with MUSE's gradient routing.

    Args:
        q, k, v: (B, H, N, D) tensors of one dtype (fp32, fp16 or bf16; the torch backend also takes
            fp64) on one device. Any strides with a contiguous last dim run without a copy, e.g.
            ``x.view(B, N, H, D).transpose(1, 2)``; a non-contiguous last dim is copied once.
        scale: logit scale, default D^-½.
        return_attn: None (no maps), ``"per_head"`` → (B, H, N, N), ``"head_mean"`` → (B, N, N).
        attn_dtype: dtype the maps are written in, fp32 or bf16.
        shield: True (MUSE): dV = Aᵀ·dO and dQ, dK come only from the maps' gradient; with the
            maps unused q and k get no gradient (None, as through the reference's detached maps).
            False: ordinary attention gradients through both paths.
        backend: ``"triton"``, ``"torch"`` (eager reference), ``"auto"`` (Triton on CUDA, torch
            otherwise), ``"cuda"`` (the compiled CUDA C++ backend: head dim 64 or 128; built on
            first use when not prebuilt).
        teacher: if given, return the topology KL loss instead of the maps, from the same fused
            forward (see :func:`topology_kl_loss` for ``teacher``, ``kl_reduction``, ``kl_eps`` and
            ``validate_teacher``). The backward is shielded: dV from dO, dQ/dK from the KL only.

    Returns:
        ``(out, attn)``, or ``(out, kl_loss)`` with a teacher: out has v's dtype and shape
        (B, H, N, D); attn is None unless requested; kl_loss is a 0-dim fp32 tensor.
    """
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v)
    if return_attn is not None and return_attn not in MAP_KINDS:
        raise ValueError(f"return_attn must be None, 'per_head' or 'head_mean', got {return_attn!r}")
    if attn_dtype not in ATTN_DTYPES:
        raise TypeError(f"attn_dtype must be torch.float32 or torch.bfloat16, got {attn_dtype}")
    if not isinstance(shield, bool):
        raise TypeError(f"shield must be a bool, got {type(shield).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    if teacher is not None:
        _check_teacher(teacher, q, kl_reduction, kl_eps)
        if return_attn is not None:
            raise ValueError("return_attn must be None when a teacher is given: the fused loss replaces the maps")
        if not shield:
            raise ValueError("shield must be True when a teacher is given: the fused loss trains q and k only")
    resolved = _resolve_backend(backend, q.device)

    if resolved == "torch":
        if teacher is None:
            return synergistic_attention_reference(
                q, k, v, scale=scale, return_attn=return_attn, attn_dtype=attn_dtype, shield=shield
            )
        if validate_teacher:
            _validate_teacher(teacher)
        return synergistic_attention_with_kl_reference(q, k, v, teacher, scale=scale, reduction=kl_reduction,
                                                       eps=kl_eps)
    _check_kernel_inputs(q, resolved, teacher)
    q, k, v, teacher = _last_dim_contiguous(q, k, v, teacher)
    attention, topology_kl = KERNELS[resolved]
    if teacher is not None:
        return topology_kl(q, k, v, teacher, scale, kl_reduction, kl_eps, validate_teacher)
    return attention(q, k, v, scale, return_attn, attn_dtype, shield)
