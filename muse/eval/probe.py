"""Training a linear head on frozen features: what the linear and segmentation probes share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProbeSettings:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


class Standardize(nn.Module):
    """Per-channel standardization with the training features' statistics (the affine-free
    BatchNorm of the usual linear-probe recipe), frozen into the probe."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        flat = features.reshape(-1, features.shape[-1]).double()
        self.register_buffer("mean", flat.mean(0).float())
        self.register_buffer("std", flat.std(0, correction=0).clamp_min(1e-6).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fit(head: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, settings: ProbeSettings,
        ignore_index: int = -100) -> nn.Module:
    """Cross-entropy training of ``head`` (AdamW, cosine schedule, seeded shuffling) on
    ``head(inputs[i]) ↔ targets[i]``; logits put classes on dimension 1, as ``F.cross_entropy`` reads."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} feature rows but {len(targets)} targets")
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(inputs) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    head.train()
    for _ in range(settings.epochs):
        for rows in torch.randperm(len(inputs), generator=generator).split(settings.batch_size):
            loss = F.cross_entropy(head(inputs[rows]), targets[rows], ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()
