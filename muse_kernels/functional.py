"""Public functional API: argument checks and backend dispatch."""

from __future__ import annotations

import math

import torch

from muse_kernels.ops.synergistic_attention import (
    SUPPORTED_HEAD_DIMS,
    synergistic_attention_triton,
    triton_interpreting,
)
from muse_kernels.reference import MAP_KINDS, synergistic_attention_reference

BACKENDS = ("auto", "triton", "torch", "cuda")
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The eager backend also takes fp64, for references and gradient checks.
TORCH_BACKEND_DTYPES = (*INPUT_DTYPES, torch.float64)
ATTN_DTYPES = (torch.float32, torch.bfloat16)


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
    if backend == "cuda":
        raise NotImplementedError(
            "backend='cuda' (the compiled CUDA C++ backend) is not available yet; "
            "use backend='triton' on CUDA tensors or backend='torch'"
        )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); CPU tensors run only under the "
            "Triton interpreter (TRITON_INTERPRET=1 set before importing muse_kernels). Use backend='torch'."
        )
    return backend


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(scale·q·kᵀ)·v that can also return its attention maps, with MUSE's gradient routing.

    Args:
        q, k, v: (B, H, N, D) tensors of one dtype (fp32, fp16 or bf16; the torch backend also takes
            fp64) on one device. Any strides
            with a contiguous last dim run without a copy, e.g. ``x.view(B, N, H, D).transpose(1, 2)``;
            a non-contiguous last dim is copied once.
        scale: logit scale, default D^-½.
        return_attn: None (no maps), ``"per_head"`` → (B, H, N, N), ``"head_mean"`` → (B, N, N).
        attn_dtype: dtype the maps are written in, fp32 or bf16.
        shield: True (MUSE): dV = Aᵀ·dO and dQ, dK come only from the maps' gradient (exactly zero
            when the maps are unused). False: ordinary attention gradients through both paths.
        backend: ``"triton"``, ``"torch"`` (eager reference), ``"auto"`` (Triton on CUDA, torch
            otherwise); ``"cuda"`` is reserved for the compiled CUDA backend.

    Returns:
        ``(out, attn)``: out has v's dtype and shape (B, H, N, D); attn is None unless requested.
    """
    _check_qkv(q, k, v)
    if return_attn is not None and return_attn not in MAP_KINDS:
        raise ValueError(f"return_attn must be None, 'per_head' or 'head_mean', got {return_attn!r}")
    if attn_dtype not in ATTN_DTYPES:
        raise TypeError(f"attn_dtype must be torch.float32 or torch.bfloat16, got {attn_dtype}")
    if not isinstance(shield, bool):
        raise TypeError(f"shield must be a bool, got {type(shield).__name__}")
    head_dim = q.shape[-1]
    if scale is None:
        scale = head_dim ** -0.5
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    resolved = _resolve_backend(backend, q.device)

    if resolved == "torch":
        return synergistic_attention_reference(
            q, k, v, scale=scale, return_attn=return_attn, attn_dtype=attn_dtype, shield=shield
        )
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16 for backend={resolved!r}, got {q.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim (q.shape[-1]) must be one of {SUPPORTED_HEAD_DIMS} for backend='triton', got {head_dim}; "
            "backend='torch' accepts any head_dim"
        )
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return synergistic_attention_triton(q, k, v, scale, return_attn, attn_dtype, shield)
