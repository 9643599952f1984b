"""Exponential moving average of the trainable weights, with the official warm-up."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(update: int, decay: float, warmup: bool = True) -> float:
    """Decay of the ``update``-th EMA update (1-based), as the official ``EMAModel`` (diffusers' rule
    without its power warm-up): with k = update − 1, 0 at k = 0 (the average starts as a copy of the
    weights), then min(decay, (1 + k) / (10 + k)). ``warmup=False``: ``decay`` from the first update."""
    if update < 1:
        raise ValueError(f"EMA updates are counted from 1, got {update}")
    if not warmup:
        return decay
    k = update - 1
    return 0.0 if k == 0 else min(decay, (1 + k) / (10 + k))


class EMA:
    """Keeps ``shadow = d·shadow + (1 − d)·param`` for every floating-point parameter and buffer of
    ``model``, in fp32, with d = ``ema_decay_at(n, decay, warmup)`` at the n-th update. ``state_dict``
    has the model's keys, so an EMA checkpoint loads into the model directly (the next stage's
    ``init_weight``); ``num_updates`` is checkpointed beside it."""

    def __init__(self, model: nn.Module, decay: float = 0.999, skip_prefixes: tuple[str, ...] = (),
                 warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # Frozen sub-models (a teacher) need no average: skip_prefixes leaves them out.
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point() and not k.startswith(skip_prefixes)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        weight = 1.0 - ema_decay_at(self.num_updates, self.decay, self.warmup)
        for key, value in model.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int | None = None) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for key in self.shadow:
            self.shadow[key].copy_(state[key])
        if num_updates is not None:
            self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for key, value in self.shadow.items():
            state[key].copy_(value.to(state[key].dtype))
