"""Drop-in modules built on the functional API."""

from __future__ import annotations

import torch
from torch import nn

from muse_kernels.functional import synergistic_attention


ROTARY_LAYOUTS = {"BNHD": 1, "BHND": 2}  # the token axis of each layout


def apply_rotary(x: torch.Tensor, base: float = 10000.0, *, layout: str | None = None) -> torch.Tensor:
    """1-D rotary embedding over the token index of ``x``, rotate-half layout.

    ``layout`` names where the tokens are, and must be given: ``"BNHD"`` (batch, tokens, heads, head
    dim: the linears' output split into heads) or ``"BHND"`` (the attention kernels' layout). Both
    are 4-D with the same kind of sizes, so a guessed layout would silently rotate across heads.

    The tables are computed per call in fp32 (fp64 for fp64 input) from the positions: they cost
    N·D/2 trig ops, follow the input's device with no buffer to move, and never lose precision to a
    module-wide ``.half()``.
    """
    if layout not in ROTARY_LAYOUTS:
        raise ValueError(f"apply_rotary needs layout='BNHD' (batch, tokens, heads, head_dim) or 'BHND' (batch, "
                         f"heads, tokens, head_dim), got layout={layout!r}: a 4-D tensor's layout cannot be "
                         "told from its shape")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"apply_rotary: x must be a 4-D floating-point tensor ({layout}), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: the head dim (x.shape[-1]) must be even, got {x.shape[-1]}")
    token_axis = ROTARY_LAYOUTS[layout]
    seq, dim = x.shape[token_axis], x.shape[-1]
    half = dim // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, half, device=x.device, dtype=dtype) / half)
    angles = torch.arange(seq, device=x.device, dtype=dtype)[:, None] * inv_freq[None, :]
    # (N, D) tables, broadcast over the batch and head axes.
    shape = [1, 1, 1, dim]
    shape[token_axis] = seq
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).view(shape)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).view(shape)
    xf = x.to(dtype)
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class SynergisticAttention(nn.Module):
    """The attention half of MUSE's Synergistic block.

    ``q_topo``/``k_topo`` (the topology stream) and ``v_sem`` (the semantic stream) project the
    tokens; q and k get a per-head RMSNorm and 1-D rotary embedding; the fused op mixes the values
    with a shielded map (dV from the output, dQ/dK only from the maps' loss); ``proj`` maps back.
    Parameter names match the official checkpoint.
    """

    def __init__(self, dim: int, num_heads: int = 8, qk_norm: bool = True, rope: bool = True,
                 rope_base: float = 10000.0, backend: str = "auto", shield: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if rope and self.head_dim % 2 != 0:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        self.rope = rope
        self.rope_base = rope_base
        self.backend = backend
        # shield=False makes a "naive shared" attention (the output's gradient reaches Q and K too),
        # the baseline MUSE is compared with.
        self.shield = shield
        self.q_topo = nn.Linear(dim, dim, bias=False)
        self.k_topo = nn.Linear(dim, dim, bias=False)
        self.v_sem = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, return_attn: str | None = None, teacher: torch.Tensor | None = None,
                kl_reduction: str = "head_mean", validate_teacher: bool = True):
        """(B, N, dim) → ``out``; ``(out, attn)`` with ``return_attn``; ``(out, kl_loss)`` with a
        ``teacher`` map ((B, N, N), or (B, H, N, N) for ``kl_reduction="per_head"``), computed by the
        fused loss without materializing the maps. ``validate_teacher=False`` skips the check that
        the teacher's rows are distributions (it reads the teacher and waits for the GPU)."""
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, tokens, dim), got shape {tuple(x.shape)}")
        bsz, seq, dim = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        # Heads are split as (B, N, H, D) and handed to the kernel as transposed views: no copies.
        q = self.q_norm(self.q_topo(x).view(bsz, seq, heads, head_dim))
        k = self.k_norm(self.k_topo(x).view(bsz, seq, heads, head_dim))
        v = self.v_sem(x).view(bsz, seq, heads, head_dim)
        if self.rope:
            q, k = apply_rotary(q, self.rope_base, layout="BNHD"), apply_rotary(k, self.rope_base, layout="BNHD")
        out, extra = synergistic_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           return_attn=return_attn, backend=self.backend, teacher=teacher,
                                           shield=self.shield, kl_reduction=kl_reduction,
                                           validate_teacher=validate_teacher)
        out = self.proj(out.transpose(1, 2).reshape(bsz, seq, dim))
        return out if extra is None else (out, extra)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, rope={self.rope}, "
                f"backend={self.backend!r}, shield={self.shield}")
