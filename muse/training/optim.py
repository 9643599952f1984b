"""AdamW parameter groups and the warm-up + cosine learning-rate schedules, as the official
``muse/utils/train_utils.py`` and ``lr_schedulers.py``."""

from __future__ import annotations

import math

import torch
from torch import nn

from muse.training.stages import BACKBONE

# The official exclusion rule: no weight decay on tensors of fewer than two dimensions (norm weights,
# biases, the logit scale) nor on any parameter whose name contains one of these.
OFFICIAL_NO_DECAY_KEYWORDS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma")


def no_weight_decay(name: str, param: torch.Tensor, keywords=OFFICIAL_NO_DECAY_KEYWORDS) -> bool:
    return param.dim() < 2 or any(keyword in name for keyword in keywords)


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0,
                 no_decay_keywords=OFFICIAL_NO_DECAY_KEYWORDS) -> list[dict]:
    """Trainable parameters in up to four groups: (backbone or not) × (decayed or not).

    Each group carries ``lr_scale`` so that the schedule sets ``lr = schedule(step) · lr_scale``.
    """
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.split(".", 1)[0] in BACKBONE
        no_decay = no_weight_decay(name, param, tuple(no_decay_keywords))
        key = (backbone, no_decay)
        if key not in groups:
            scale = backbone_lr_scale if backbone else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": lr * scale, "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    backbone_lr_scale: float = 1.0, no_decay_keywords=OFFICIAL_NO_DECAY_KEYWORDS) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, backbone_lr_scale, no_decay_keywords)
    if not groups:
        raise ValueError("no trainable parameters: check the stage's trainable set")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def build_discriminator_optimizer(discriminator: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                                  no_decay_keywords=OFFICIAL_NO_DECAY_KEYWORDS) -> torch.optim.AdamW:
    """The official discriminator AdamW: the undecayed group (GroupNorm weights, biases) first, then the
    decayed one, each in parameter order, so an official ``optimizer_1.bin`` has the same layout."""
    undecayed, decayed = {"params": [], "names": [], "weight_decay": 0.0}, {"params": [], "names": [],
                                                                           "weight_decay": weight_decay}
    for name, param in discriminator.named_parameters():
        group = undecayed if no_weight_decay(name, param, tuple(no_decay_keywords)) else decayed
        group["params"].append(param)
        group["names"].append(name)
    return torch.optim.AdamW([g for g in (undecayed, decayed) if g["params"]], lr=lr, betas=tuple(betas))


def lr_at(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The official schedule at optimizer step ``step`` (0-based): linear warm-up from 0 (step 0 runs at
    LR 0) to ``base_lr`` at ``warmup_steps``, then cosine decay to ``end_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_lr + 0.5 * (base_lr - end_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def discriminator_schedule(optim_cfg, steps: int, disc_start: int) -> dict[str, float]:
    """``lr_at`` arguments for the discriminator at its own update count, as official: warm-up as long as
    the generator's, cosine over the steps from ``disc_start`` on, ending at ``disc_lr · end_lr / lr``
    (the official scheduler reuses the generator's LR ratio). ``optim.disc_warmup_steps`` and
    ``optim.disc_end_lr`` replace those when set."""
    oc = optim_cfg
    warmup = oc.warmup_steps if oc.disc_warmup_steps is None else oc.disc_warmup_steps
    end_lr = oc.disc_lr * oc.end_lr / oc.lr if oc.disc_end_lr is None else oc.disc_end_lr
    return {"base_lr": oc.disc_lr, "end_lr": end_lr, "warmup_steps": warmup,
            "total_steps": max(0, steps - disc_start)}
