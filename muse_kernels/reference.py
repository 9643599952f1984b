"""Pure-PyTorch references, shared by the ``torch`` backend, the tests and the benchmarks.

They follow the official MUSE code: logits in the input dtype, softmax in fp32 (or fp64 for fp64
inputs), the map cast back to the value dtype for ``A·V``, and the gradient shield as
``stopgrad(A)·V``. Every N×N map is materialized: this is the eager baseline the kernels replace.

Masks follow transformers' eager attention: a masked logit gets finfo.min added, which absorbs it,
so a row whose every key is masked is uniform over all keys (and its softmax gradient flows as
eager's autograd computes it).
"""

from __future__ import annotations

import math

import torch

MAP_KINDS = ("per_head", "head_mean")
# Additive mask values at or below this mask their entry, like the kernels' clamp at -1e30 in log2 units.
ADDITIVE_MASKED = -1.0e30 * math.log(2.0)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · q·kᵀ computed in the input dtype, then promoted to the softmax dtype."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    return logits.to(_softmax_dtype(logits.dtype))


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """A = softmax(scale · q·kᵀ) with the softmax in fp32 (fp64 for fp64 inputs); shape (B, H, N, N)."""
    return torch.softmax(_attention_logits(q, k, scale), dim=-1)


def attention_bias(attn_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The additive bias transformers' eager attention adds to the logits: 0 where attended, finfo.min
    where masked, an additive mask's own values elsewhere. ``causal`` is bottom-right aligned (query i
    sees key j iff j ≤ i + k_len − q_len). None when there is nothing to add."""
    if attn_mask is None and not causal:
        return None
    masked = torch.finfo(dtype).min
    bias = torch.zeros((), dtype=dtype, device=device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.where(attn_mask, bias, masked)
        else:
            bias = attn_mask.to(dtype)
            bias = torch.where(bias <= ADDITIVE_MASKED, masked, bias)
    if causal:
        rows = torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(k_len, device=device)[None, :]
        bias = torch.where(cols <= rows + (k_len - q_len), bias, masked)
    return bias


def synergistic_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    return_attn: str | None = None,
    attn_dtype: torch.dtype | None = torch.float32,
    shield: bool = True,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager Synergistic attention. ``attn_dtype=None`` keeps the maps in the softmax dtype.

    k, v may have fewer heads than q (grouped-query attention: query head h reads kv head
    h // (H / H_kv)) and their own length; ``attn_mask`` (4-D, broadcastable, bool or additive) and
    ``causal`` as in :func:`attention_bias`."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = _attention_logits(q, k, scale)
    bias = attention_bias(attn_mask, causal, q.shape[2], k.shape[2], logits.dtype, logits.device)
    probs = torch.softmax(logits if bias is None else logits + bias, dim=-1)
    # The gradient shield: the output path treats the map as a constant, so only the maps' own
    # gradient reaches q and k.
    mixing = probs.detach() if shield else probs
    out = torch.matmul(mixing.to(v.dtype), v)
    if return_attn is None:
        return out, None
    attn = probs if return_attn == "per_head" else probs.mean(dim=1)
    if attn_dtype is not None:
        attn = attn.to(attn_dtype)
    return out, attn


KL_REDUCTIONS = ("head_mean", "per_head")


def _topology_kl(logits: torch.Tensor, probs: torch.Tensor, teacher: torch.Tensor, reduction: str,
                 eps: float) -> torch.Tensor:
    t = teacher.to(probs.dtype)
    if reduction == "head_mean":
        return (torch.xlogy(t, t) - t * torch.log(probs.mean(dim=1) + eps)).sum(-1).mean()
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return (torch.xlogy(t, t) - t * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def topology_kl_loss_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    teacher: torch.Tensor,
    scale: float | None = None,
    reduction: str = "head_mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Topology KL of the student's maps against a teacher, with the maps materialized.

    ``head_mean`` (official code): s̄ = mean over heads of A; mean over (batch, row) of
    Σ_j t·(log t − log(s̄ + eps)). ``per_head`` (the paper): mean over (batch, head, row) of
    KL(t ‖ A) with log A = S − LSE; a (B, N, N) teacher is shared by the heads. 0·log 0 = 0.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = _attention_logits(q, k, scale)
    return _topology_kl(logits, torch.softmax(logits, dim=-1), teacher, reduction, eps)


def synergistic_attention_with_kl_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    teacher: torch.Tensor,
    scale: float | None = None,
    reduction: str = "head_mean",
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training step's attention: maps materialized once, shielded output, KL on the maps."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = _attention_logits(q, k, scale)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.detach().to(v.dtype), v)
    return out, _topology_kl(logits, probs, teacher, reduction, eps)
