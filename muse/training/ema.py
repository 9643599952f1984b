"""Exponential moving average of the trainable weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay·shadow + (1 − decay)·param`` for every floating-point parameter and buffer
    of ``model``, in fp32. ``state_dict`` has the model's keys, so an EMA checkpoint loads into the
    model directly (the next stage's ``init_weight``)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, skip_prefixes: tuple[str, ...] = ()):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        # Frozen sub-models (a teacher) need no average: skip_prefixes leaves them out.
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point() and not k.startswith(skip_prefixes)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for key in self.shadow:
            self.shadow[key].copy_(state[key])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for key, value in self.shadow.items():
            state[key].copy_(value.to(state[key].dtype))
