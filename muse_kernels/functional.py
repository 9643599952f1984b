"""Public functional API: argument checks and backend dispatch."""

from __future__ import annotations

import math
import numbers

import torch

from muse_kernels.interpreter_fixes import apply_interpreter_bf16_fixes, bf16_supported
from muse_kernels.ops.synergistic_attention import (
    SUPPORTED_HEAD_DIMS,
    is_general,
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

if triton_interpreting():
    apply_interpreter_bf16_fixes()

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


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_shape: bool = True) -> None:
    """``same_shape=False`` (attention) lets k, v have their own length and fewer heads (GQA)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(x.shape)}")
        if x.dtype not in TORCH_BACKEND_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 (or float64 with backend='torch'), "
                            f"got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if same_shape and x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if not same_shape:
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
            raise ValueError(f"k, v must have q's batch size and head_dim (q: {tuple(q.shape)}), got {tuple(k.shape)}")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
            raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k's and v's heads ({k.shape[1]}), "
                             "grouped-query attention")
        if k.shape[2] == 0:
            raise ValueError("k, v must have seq_len (dim 2) >= 1, got 0")
    if q.shape[2] == 0:
        raise ValueError("q, k, v must have seq_len (dim 2) >= 1, got 0")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q, k, v must have batch and heads >= 1, got shape {tuple(q.shape)}")


def _check_attn_mask(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() != 4 or any(m not in (1, n) for m, n in zip(attn_mask.shape, full)):
        raise ValueError(f"attn_mask must be 4-D and broadcastable to (batch, heads, q_len, k_len) = {full} "
                         f"(each dim 1 or full), got shape {tuple(attn_mask.shape)}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to the logits), got "
                        f"{attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    if attn_mask.requires_grad:
        raise ValueError("attn_mask must not require grad: gradients with respect to the mask are not supported")


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
    bf16 = q.dtype == torch.bfloat16 or (teacher is not None and teacher.dtype == torch.bfloat16)
    if bf16 and backend == "triton" and q.device.type != "cuda" and triton_interpreting():
        supported, reason = bf16_supported()
        if not supported:
            raise RuntimeError(f"bf16 inputs under the Triton interpreter would give wrong numbers: its bf16 "
                               f"arithmetic could not be corrected in this triton version ({reason}); use float32 "
                               "inputs or backend='torch' on the CPU")
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
    # numbers.Real admits numpy scalars (np.float32 is not a float); a tensor or a string is not a scale.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (a Python or numpy scalar), got {scale!r} "
                         f"of type {type(scale).__name__}")
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
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(scale·q·kᵀ)·v that can also return its attention maps, with MUSE's gradient routing.

    Args:
        q, k, v: q (B, H, N, D), k and v (B, H_kv, N_k, D) of one dtype (fp32, fp16 or bf16; the torch
            backend also takes fp64) on one device; N_k = N and H_kv = H is self-attention (MUSE),
            otherwise the general path below. Any strides with a contiguous last dim run without a copy, e.g.
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
        attn_mask: None, or a 4-D mask broadcastable to (B, H, N, N_k) (each dim 1 or full, read
            through zero strides, never copied): bool (True = attend) or floating (added to the
            scaled logits; values at or below -1e30·ln 2 mask, -inf included; a float mask is
            converted to fp32 once).
        causal: a causal mask, bottom-right aligned: query i sees key j iff j ≤ i + N_k − N (the
            queries are the last N positions, as with a KV cache; for N = N_k the usual triangle).
            Rows whose every key is masked attend uniformly to all N_k keys, as transformers' eager
            attention defines them. The general path (mask, causal, H_kv < H, N_k ≠ N) takes
            ``shield=False`` and no teacher, and runs on the ``triton`` and ``torch`` backends.

    Returns:
        ``(out, attn)``, or ``(out, kl_loss)`` with a teacher: out has v's dtype and shape
        (B, H, N, D); attn (B, H, N, N_k) or (B, N, N_k) is None unless requested; kl_loss is a 0-dim
        fp32 tensor.
    """
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v, same_shape=False)
    if return_attn is not None and return_attn not in MAP_KINDS:
        raise ValueError(f"return_attn must be None, 'per_head' or 'head_mean', got {return_attn!r}")
    if attn_dtype not in ATTN_DTYPES:
        raise TypeError(f"attn_dtype must be torch.float32 or torch.bfloat16, got {attn_dtype}")
    if not isinstance(shield, bool):
        raise TypeError(f"shield must be a bool, got {type(shield).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    if attn_mask is not None:
        _check_attn_mask(attn_mask, q, k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    general = is_general(q, k, attn_mask, causal)
    if general and shield:
        raise ValueError("shield=True (MUSE's gradient shield) supports only self-attention without masks; "
                         "pass shield=False with attn_mask, causal, grouped-query heads or k_len != q_len")
    if teacher is not None:
        if general:
            raise ValueError("a teacher (fused topology loss) needs self-attention without masks: no attn_mask, "
                             "causal, grouped-query heads or k_len != q_len")
        _check_teacher(teacher, q, kl_reduction, kl_eps)
        if return_attn is not None:
            raise ValueError("return_attn must be None when a teacher is given: the fused loss replaces the maps")
        if not shield:
            raise ValueError("shield must be True when a teacher is given: the fused loss trains q and k only")
    resolved = _resolve_backend(backend, q.device)

    if resolved == "cuda" and general:
        raise ValueError("backend='cuda' supports only self-attention without masks (MUSE); use backend='triton' "
                         "for attn_mask, causal, grouped-query heads or k_len != q_len")
    if resolved == "torch":
        if teacher is None:
            return synergistic_attention_reference(
                q, k, v, scale=scale, return_attn=return_attn, attn_dtype=attn_dtype, shield=shield,
                attn_mask=attn_mask, causal=causal,
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
    if general:
        return attention(q, k, v, scale, return_attn, attn_dtype, shield, attn_mask, causal)
    return attention(q, k, v, scale, return_attn, attn_dtype, shield)
