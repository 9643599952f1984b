"""The Synergistic block (SPEC §2), on top of ``muse_kernels.SynergisticAttention``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse_kernels import SynergisticAttention


class SwiGLU(nn.Module):
    """w3(silu(w1·x) ⊙ w2·x), three bias-free linears as in the official checkpoint: ``w1`` and ``w2``
    map dim → hidden, ``w3`` is the down projection (not LLaMA's convention, where w2 is)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


@dataclass
class BlockOutput:
    x: torch.Tensor
    v_itc: torch.Tensor
    attn: torch.Tensor | None = None
    loss_topo: torch.Tensor | None = None


class SynergisticBlock(SynergisticAttention):
    """x ← x + Attn(RMSNorm(x)); x ← x + SwiGLU(RMSNorm(x)); v_itc = W_itc·x_in.

    The attention parameters sit at the block's top level (``q_topo``, ``k_topo``, ``v_sem``,
    ``q_norm``, ``k_norm``, ``proj``) beside ``norm1``, ``norm2``, ``mlp.w1/w2/w3`` and ``v_itc``:
    the official checkpoint's names, loadable without remapping.
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, rope: bool = True,
                 rope_base: float = 10000.0, backend: str = "auto"):
        super().__init__(dim, num_heads=num_heads, qk_norm=True, rope=rope, rope_base=rope_base, backend=backend)
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2 * mlp_ratio * dim / 3))
        self.v_itc = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, return_attn: str | None = None, teacher: torch.Tensor | None = None,
                kl_reduction: str = "head_mean", validate_teacher: bool = True) -> BlockOutput:
        """``teacher`` (B, N, N) gives the fused topology loss; ``return_attn`` the maps instead."""
        v_itc = self.v_itc(x)
        attn_out = super().forward(self.norm1(x), return_attn=return_attn, teacher=teacher,
                                   kl_reduction=kl_reduction, validate_teacher=validate_teacher)
        extra = None
        if teacher is not None or return_attn is not None:
            attn_out, extra = attn_out
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        if teacher is not None:
            return BlockOutput(x=x, v_itc=v_itc, loss_topo=extra)
        return BlockOutput(x=x, v_itc=v_itc, attn=extra)
