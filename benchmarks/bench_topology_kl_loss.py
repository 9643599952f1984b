"""Attention + topology KL loss, the training step's attention, across providers.

Providers: ``eager`` (the official code: maps materialized, shielded output, KL on the maps),
``sdpa_flash`` (attention alone, no maps, no loss: the speed and memory bar the fused loss is held
to), ``ours`` (``synergistic_attention(..., teacher=)``: one fused forward, no N×N map for
``per_head``, only the (B, N, N) head mean for ``head_mean``) and ``cuda`` (the same on the CUDA C++
backend). The ``loss_only`` variants time
``topology_kl_loss`` alone against the eager loss on materialized maps.
"""

from __future__ import annotations

import torch

from benchmarks.bench_synergistic_attention import (_sdpa_context, attention_flops, cuda_backend, make_qkv,
                                                    ours_backend)
from benchmarks.common import Case, SkipCase, build_cases
from muse_kernels import synergistic_attention, topology_kl_loss
from muse_kernels.reference import synergistic_attention_with_kl_reference, topology_kl_loss_reference

OP = "topology_kl_loss"
# variant → (reduction, with attention output)
VARIANTS = {
    "attn+kl_per_head": ("per_head", True),
    "attn+kl_head_mean": ("head_mean", True),
    "kl_only_per_head": ("per_head", False),
    "kl_only_head_mean": ("head_mean", False),
}
PROVIDERS = ("eager", "sdpa_flash", "ours", "cuda")
MODES = ("fwd", "fwd+bwd")


def make_teacher(shape: dict, device: torch.device) -> torch.Tensor:
    return torch.softmax(torch.randn(shape["B"], shape["N"], shape["N"], device=device), dim=-1)


def step_fn(provider: str, reduction: str, with_attention: bool, device: torch.device):
    """A function (q, k, v, teacher) → (outputs to backpropagate)."""
    if provider == "eager":
        if with_attention:
            return lambda q, k, v, t: list(synergistic_attention_with_kl_reference(q, k, v, t, reduction=reduction))
        return lambda q, k, v, t: [topology_kl_loss_reference(q, k, t, reduction=reduction)]
    if provider == "sdpa_flash":
        if not with_attention:
            raise SkipCase("the SDPA bar is attention alone: only the attention+loss variants")
        if device.type != "cuda":
            raise SkipCase("SDPA flash needs a CUDA device")
        _sdpa_context("flash")  # raises SkipCase now if this torch lacks the backend

        def run(q, k, v, t):
            with _sdpa_context("flash"):
                return [torch.nn.functional.scaled_dot_product_attention(q, k, v)]
        return run
    if provider in ("ours", "cuda"):
        backend = ours_backend(device) if provider == "ours" else cuda_backend(device)
        if with_attention:
            return lambda q, k, v, t: list(synergistic_attention(
                q, k, v, teacher=t, kl_reduction=reduction, validate_teacher=False, backend=backend))
        return lambda q, k, v, t: [topology_kl_loss(q, k, t, reduction=reduction, validate=False, backend=backend)]
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def timed_step(run, mode: str, shape: dict, dtype: torch.dtype, device: torch.device):
    q, k, v = make_qkv(shape, dtype, device, requires_grad=mode != "fwd")
    teacher = make_teacher(shape, device)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return run(q, k, v, teacher)
        return step
    outputs = run(q, k, v, teacher)
    grads = [torch.randn_like(o) for o in outputs]
    return lambda: torch.autograd.grad(run(q, k, v, teacher), (q, k, v), grads, allow_unused=True)


def cases(shapes: list[dict], dtype: torch.dtype, device: torch.device, providers, modes, variants) -> list[Case]:
    def make_step(provider, variant, mode, shape):
        reduction, with_attention = VARIANTS[variant]
        return timed_step(step_fn(provider, reduction, with_attention, device), mode, shape, dtype, device)

    return build_cases(OP, shapes, dtype, variants, modes, providers, make_step, attention_flops,
                       lambda shape, variant, mode: 0.0)
