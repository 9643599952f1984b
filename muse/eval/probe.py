"""Training a head on frozen features: what the linear and segmentation probes share.

The settings come from a protocol (``muse.eval.protocols``): the optimizer (SGD with momentum, Nesterov
or not, or AdamW), the learning-rate schedule (cosine stepped once per epoch as the official linear
probe's ``CosineAnnealingLR(T_max=epochs)``, cosine per step, or constant), which epochs are validated
and which validated epoch is reported (the best, as the official probes do, or the final one).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("muse.eval")


class Standardize(nn.Module):
    """Per-channel standardization with the training features' statistics, frozen into the probe (the
    fast protocol's stand-in for BatchNorm)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        flat = features.reshape(-1, features.shape[-1]).double()
        self.register_buffer("mean", flat.mean(0).float())
        self.register_buffer("std", flat.std(0, correction=0).clamp_min(1e-6).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


def make_optimizer(parameters, settings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be sgd or adamw, got {settings.optimizer!r}")


def make_schedule(optimizer, settings, steps_per_epoch: int):
    """(scheduler or None, whether it steps per optimizer step rather than per epoch)."""
    if settings.schedule == "cosine_per_epoch":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs), False
    if settings.schedule == "cosine_per_step":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch), True
    if settings.schedule == "constant":
        return None, False
    raise ValueError(f"schedule must be cosine_per_epoch, cosine_per_step or constant, got {settings.schedule!r}")


def evaluation_epochs(epochs: int, every: int) -> list[int]:
    """The epochs (1-based) after which the probe is validated: every ``every``-th and the last."""
    return [e for e in range(1, epochs + 1) if (every > 0 and e % every == 0) or e == epochs]


def select_epoch(history: list[dict], metric: str, rule: str) -> dict:
    """The reported epoch among the validated ones: ``best`` (the first to reach the highest
    ``metric``, as the official ``if acc > best``) or ``final``."""
    validated = [h for h in history if metric in h]
    if not validated:
        raise ValueError(f"no validated epoch has {metric!r}")
    if rule == "final":
        return validated[-1]
    if rule == "best":
        return max(validated, key=lambda h: h[metric])  # max keeps the first of equal values
    raise ValueError(f"select must be best or final, got {rule!r}")


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def train_probe(head: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, settings, evaluate=None,
                metric: str | None = None, ignore_index: int = -100, device: str | torch.device = "cpu") -> list[dict]:
    """Cross-entropy training of ``head`` on ``head(inputs[i]) ↔ targets[i]`` (logits with classes on
    dimension 1), rows reshuffled every epoch by a generator seeded with ``settings.seed``; the data
    stays where it is and moves to ``device`` a batch at a time. ``evaluate(head)`` → {metric: value}
    runs after the protocol's validated epochs; with ``settings.select == "best"`` the head ends with
    the weights of the epoch ``select_epoch`` reports (the official segmentation probe keeps that
    head). Returns one {"epoch", "lr", "loss", ...} per epoch; the head is left in eval mode."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} feature rows but {len(targets)} targets")
    batch_size, drop_last = settings.probe_batch_size, getattr(settings, "drop_last", False)
    steps_per_epoch = len(inputs) // batch_size if drop_last else math.ceil(len(inputs) / batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(inputs)} training samples make no full batch of {batch_size} (drop_last)")
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = make_optimizer(head.parameters(), settings)
    schedule, per_step = make_schedule(optimizer, settings, steps_per_epoch)
    validate_after = set(evaluation_epochs(settings.epochs, settings.eval_every))
    batchnorm = _has_batchnorm(head)
    keep_best = evaluate is not None and settings.select == "best"
    if keep_best and metric is None:
        raise ValueError("selecting the best epoch needs the metric it is judged by")
    history, best_state, best_value = [], None, None
    for epoch in range(1, settings.epochs + 1):
        head.train()
        entry = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        losses = []
        for rows in torch.randperm(len(inputs), generator=generator).split(batch_size)[:steps_per_epoch]:
            if len(rows) == 1 and batchnorm:
                # BatchNorm cannot normalize one sample by its batch (the official loop would stop here).
                log.warning("epoch %d: skipped a last batch of one sample", epoch)
                continue
            logits = head(inputs[rows].to(device))
            loss = F.cross_entropy(logits, targets[rows].to(device).long(), ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if schedule is not None and per_step:
                schedule.step()
        if schedule is not None and not per_step:
            schedule.step()
        entry["loss"] = sum(losses) / max(len(losses), 1)
        head.eval()
        if evaluate is not None and epoch in validate_after:
            with torch.no_grad():
                entry.update(evaluate(head))
            if keep_best and (best_value is None or entry[metric] > best_value):
                best_value = entry[metric]
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        history.append(entry)
    if best_state is not None:
        head.load_state_dict(best_state)
    return history
