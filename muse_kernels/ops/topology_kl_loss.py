"""Topology KL loss of the student's attention maps against a teacher, without the N×N maps.

The kernels are the Synergistic attention kernels (``synergistic_attention.py``), driven in two ways:

* ``per_head`` (the paper): KL(t ‖ A) per (batch, head, row) needs three running sums in the
  flash-style forward (Σ t·log t, Σ t·S, Σ t) and the row LSE — no map is ever written. Its
  gradient with respect to the logits is ``(rowsum(t)·A − t)`` times the upstream factor, which the
  backward kernels add to dS tile by tile, again with no map in memory.
* ``head_mean`` (official code): the loss needs s̄ = mean over heads of A, which stays in registers
  (``head_mean_kl_forward``): where every key fits in one tile (fp16/bf16, N ≤ 256) one program per
  (batch, query tile) runs all heads; elsewhere the maps kernel's head-mean programs, one per (batch,
  query block, key block), after the flash forward's LSE. Either way the kernel writes only the row
  terms and the map gradient dL/ds̄ = −t/(s̄ + eps), which enters the attention backward as a
  head-mean map gradient scaled by the upstream gradient on the device. Backends without such a
  kernel (CUDA C++) write the (B, N, N) mean map and do the loss's elementwise work over it.

With ``v`` the same forward also produces the attention output (one pass over Q·Kᵀ for both), and
the backward is shielded: dV from dO, dQ/dK from the KL only.
"""

from __future__ import annotations

import torch

from muse_kernels.ops.synergistic_attention import (
    head_mean_kl_forward,
    needs_autograd,
    new_output_like,
    synergistic_attention_backward,
    synergistic_attention_forward,
    use_eager_path,
)

KL_REDUCTIONS = ("head_mean", "per_head")


def validate_teacher(teacher: torch.Tensor, tol: float | None = None) -> None:
    """Rows of a teacher map must be probability distributions: finite, non-negative, summing to 1."""
    if tol is None:
        tol = 2e-2 if teacher.dtype == torch.bfloat16 else 1e-3
    t = teacher.float()
    # The three statistics come back in one transfer: each read waits for the GPU.
    finite, minimum, worst = torch.stack([
        torch.isfinite(t).all().float(), t.min(), (t.sum(-1) - 1).abs().max(),
    ]).tolist()
    if not finite:
        raise ValueError("teacher has non-finite entries (nan or inf)")
    if minimum < 0:
        raise ValueError(f"teacher has negative entries (min {minimum:.3e}); rows must be distributions")
    if worst > tol:
        raise ValueError(f"teacher rows must sum to 1 (within {tol:g}); the worst row is off by {worst:.3e}. "
                         "Renormalize the teacher, or pass validate=False to skip this check")


def topology_kl_forward(
    forward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, teacher: torch.Tensor,
    scale: float, reduction: str, eps: float, fused_head_mean=None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (out or None, loss, lse2, head-mean map gradient −t / (s̄ + eps) or None); ``forward``
    is a backend's attention forward launcher (``synergistic_attention_forward``'s signature),
    ``fused_head_mean`` its head-mean loss without the mean map (``head_mean_kl_forward``'s), if it has one."""
    if reduction == "per_head":
        out, _, lse, row_kl = forward(q, k, v, scale, teacher=teacher)
        return out, row_kl.mean(), lse, None
    if fused_head_mean is not None:
        return fused_head_mean(q, k, v, teacher, scale, eps)
    out, mean_map, lse, _ = forward(q, k, v, scale, "head_mean", torch.float32)
    t = teacher.float()
    denom = mean_map + eps
    loss = (torch.xlogy(t, t) - t * torch.log(denom)).sum(-1).mean()
    return out, loss, lse, -t / denom


def topology_kl_backward(
    backward, grad_out: torch.Tensor | None, grad_loss: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor,
    teacher: torch.Tensor, map_grad: torch.Tensor | None, scale: float, reduction: str, eps: float,
    scales_map_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``backward`` is a backend's attention backward launcher (``synergistic_attention_backward``'s
    signature); with ``scales_map_grad`` it takes ``dattn_kl_scale`` and applies the upstream
    gradient to the head-mean map gradient itself (no pass over the (B, N, N) tensor here)."""
    bsz, heads, seq, _ = q.shape
    if grad_loss is None:
        return backward(grad_out, None, q, k, v, out, lse, scale)
    if reduction == "per_head":
        return backward(grad_out, None, q, k, v, out, lse, scale,
                        teacher=teacher, kl_grad=grad_loss.float(), kl_scale=1.0 / (bsz * heads * seq))
    if scales_map_grad:
        return backward(grad_out, map_grad, q, k, v, out, lse, scale,
                        kl_grad=grad_loss.float(), dattn_kl_scale=1.0 / (bsz * seq))
    return backward(grad_out, map_grad * (grad_loss.float() / (bsz * seq)), q, k, v, out, lse, scale)


# ----------------------------------------------------------------------------------------------------
# torch.library registration. ``v`` is optional: without it the op is the loss alone. The CUDA C++
# backend registers its launchers through the same function.


def register_topology_kl_ops(name: str, forward, backward, fused_head_mean=None, scales_map_grad: bool = False):
    """Custom ops ``muse_kernels::<name>_fwd`` / ``_bwd`` around a backend's attention launchers
    (``fused_head_mean``, ``scales_map_grad``: see ``topology_kl_forward`` / ``_backward``); returns
    ``(q, k, v or None, teacher, scale, reduction, eps, validate) → (out or None, loss)``."""

    def run_forward(q, k, v, teacher, scale, reduction, eps, validate):
        if validate:
            validate_teacher(teacher)
        return topology_kl_forward(forward, q, k, v, teacher, scale, reduction, eps, fused_head_mean)

    def run_backward(grad_out, grad_loss, q, k, v, out, lse, teacher, map_grad, scale, reduction, eps):
        return topology_kl_backward(backward, grad_out, grad_loss, q, k, v, out, lse, teacher, map_grad,
                                    scale, reduction, eps, scales_map_grad)

    @torch.library.custom_op(f"muse_kernels::{name}_fwd", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, teacher: torch.Tensor,
        scale: float, reduction: str, eps: float, validate: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Validation reads the data, so it lives inside the opaque op: torch.compile sees no
        # data-dependent branch and does not break the graph.
        out, loss, lse, map_grad = run_forward(q, k, v, teacher, scale, reduction, eps, validate)
        # Custom ops cannot return None (nor one tensor twice): absent outputs are distinct empty tensors.
        return (q.new_empty(0) if out is None else out), loss, lse, (q.new_empty(0) if map_grad is None else map_grad)

    @fwd_op.register_fake
    def _(q, k, v, teacher, scale, reduction, eps, validate):
        bsz, heads, seq, _ = q.shape
        out = q.new_empty(0) if v is None else new_output_like(v)
        map_grad = q.new_empty(bsz, seq, seq, dtype=torch.float32) if reduction == "head_mean" else q.new_empty(0)
        return out, q.new_empty((), dtype=torch.float32), q.new_empty(bsz, heads, seq, dtype=torch.float32), map_grad

    @torch.library.custom_op(f"muse_kernels::{name}_bwd", mutates_args=())
    def bwd_op(
        grad_out: torch.Tensor | None, grad_loss: torch.Tensor | None,
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor,
        teacher: torch.Tensor, map_grad: torch.Tensor | None, scale: float, reduction: str, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = run_backward(grad_out, grad_loss, q, k, v, out, lse, teacher, map_grad, scale, reduction, eps)
        return dq, dk, q.new_empty(0) if dv is None else dv

    @bwd_op.register_fake
    def _(grad_out, grad_loss, q, k, v, out, lse, teacher, map_grad, scale, reduction, eps):
        return torch.empty_like(q), torch.empty_like(k), q.new_empty(0) if v is None else torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, teacher, scale, reduction, eps, _validate = inputs
        out, _loss, lse, map_grad = output
        ctx.set_materialize_grads(False)
        ctx.has_v = v is not None
        ctx.save_for_backward(q, k, v, out if ctx.has_v else None, lse, teacher,
                              map_grad if reduction == "head_mean" else None)
        ctx.scale, ctx.reduction, ctx.eps = scale, reduction, eps

    def gradients(ctx, grad_out, grad_loss, run):
        q, k, v, out, lse, teacher, map_grad = ctx.saved_tensors
        dq, dk, dv = run(grad_out if ctx.has_v else None, grad_loss, q, k, v, out, lse, teacher, map_grad,
                         ctx.scale, ctx.reduction, ctx.eps)
        return dq, dk, (dv if ctx.has_v else None), None, None, None, None, None

    def backward_formula(ctx, grad_out, grad_loss, _grad_lse, _grad_map_grad):
        return gradients(ctx, grad_out, grad_loss, bwd_op)

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)

    class EagerTopologyKL(torch.autograd.Function):
        """The ops' computation without the dispatcher, for eager calls (see ``EagerAttention``)."""

        @staticmethod
        def forward(ctx, q, k, v, teacher, scale, reduction, eps, validate):
            out, loss, lse, map_grad = run_forward(q, k, v, teacher, scale, reduction, eps, validate)
            setup_context(ctx, (q, k, v, teacher, scale, reduction, eps, validate), (out, loss, lse, map_grad))
            return out, loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out, grad_loss):
            return gradients(ctx, grad_out, grad_loss, run_backward)

    def topology_kl(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, teacher: torch.Tensor,
        scale: float, reduction: str, eps: float, validate: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(out or None, loss)."""
        if use_eager_path(q, k, v, teacher):
            if not needs_autograd(q, k, v):
                out, loss, _lse, _map_grad = run_forward(q, k, v, teacher, float(scale), reduction, float(eps), validate)
                return out, loss
            return EagerTopologyKL.apply(q, k, v, teacher, float(scale), reduction, float(eps), validate)
        out, loss, _lse, _map_grad = fwd_op(q, k, v, teacher, float(scale), reduction, float(eps), validate)
        return (out if v is not None else None), loss

    return topology_kl


topology_kl_triton = register_topology_kl_ops("topology_kl", synergistic_attention_forward,
                                              synergistic_attention_backward, head_mean_kl_forward,
                                              scales_map_grad=True)
