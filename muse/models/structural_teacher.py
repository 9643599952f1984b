"""An offline teacher with real structure, for configs without DINOv3 weights (``teacher.kind:
structural``; the demo, tests).

A randomly initialised DINOv3 attends almost uniformly (its maps carry no structure to align with).
This teacher computes attention maps from the image itself, with the property a self-supervised
teacher's last layer has: a patch attends to patches of the same region — similar colour and
texture — and more to near ones than far ones. For patch descriptors c (mean colour), t (texture:
colour spread and gradient energy) and p (position on the unit grid):

    A[i, j] = softmax_j( −|cᵢ − cⱼ|²/σ_c² − |tᵢ − tⱼ|²/σ_t² − |pᵢ − pⱼ|²/σ_p² )

at the teacher's patch grid. The tokenizer then treats these maps exactly like DINOv3's
(renormalization, Ψ resize to the student grid, layout), so the loss, kernels and plots are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StructuralTeacher(nn.Module):
    """Image → (B, N, N) patch-to-patch attention maps (rows sum to 1), N = (H/p)·(W/p). No weights."""

    name = "structural teacher (colour, texture and position affinities)"

    def __init__(self, patch_size: int, colour_sigma: float, texture_sigma: float, distance_sigma: float):
        super().__init__()
        for key, value in (("patch_size", patch_size), ("colour_sigma", colour_sigma),
                           ("texture_sigma", texture_sigma), ("distance_sigma", distance_sigma)):
            if not value > 0:
                raise ValueError(f"model.teacher.{key} must be > 0, got {value!r}")
        self.patch_size = patch_size
        self.sigmas = (colour_sigma, texture_sigma, distance_sigma)

    def descriptors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels: (B, 3, H, W) in [0, 1], whole patches → colour (B, N, 3), texture (B, N, 4),
        position (B, N, 2)."""
        p = self.patch_size
        colour = F.avg_pool2d(pixels, p)
        spread = (F.avg_pool2d(pixels ** 2, p) - colour ** 2).clamp_min(0).sqrt()
        grey = pixels.mean(dim=1, keepdim=True)
        dy = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
        dx = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1, 0, 0))
        edges = F.avg_pool2d((dx ** 2 + dy ** 2).sqrt(), p)
        h, w = colour.shape[-2:]
        rows = (torch.arange(h, dtype=pixels.dtype, device=pixels.device) + 0.5) / max(h, w)
        cols = (torch.arange(w, dtype=pixels.dtype, device=pixels.device) + 0.5) / max(h, w)
        position = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(1, h * w, 2)
        flat = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
        texture = torch.cat([flat(spread), flat(edges)], dim=-1)
        return flat(colour), texture, position.expand(pixels.shape[0], -1, -1)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        colour, texture, position = self.descriptors(pixels.float())
        logits = sum(-torch.cdist(x, x).pow(2) / sigma ** 2
                     for x, sigma in zip((colour, texture, position), self.sigmas))
        return torch.softmax(logits, dim=-1)
