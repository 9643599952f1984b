"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from muse.training.stages import BACKBONE

NO_DECAY_NAMES = ("logit_scale",)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Norm weights and biases are 1-D; the logit scale is a 0-dim temperature.
    return param.dim() <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Trainable parameters in up to four groups: (backbone or not) × (decayed or not).

    Each group carries ``lr_scale`` so that the schedule sets ``lr = schedule(step) · lr_scale``.
    """
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.split(".", 1)[0] in BACKBONE
        no_decay = _no_decay(name, param)
        key = (backbone, no_decay)
        if key not in groups:
            scale = backbone_lr_scale if backbone else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": lr * scale, "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    backbone_lr_scale: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, backbone_lr_scale)
    if not groups:
        raise ValueError("no trainable parameters: check the stage's trainable set")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_at(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``end_lr`` at
    ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end_lr + 0.5 * (base_lr - end_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
