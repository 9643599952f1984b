"""Flow matching as the paper's eq. 6: x_t = (1 − t)·x₀ + t·ε, the model predicts v = ε − x₀ (t = 0 is
data, t = 1 noise, as SANA and diffusers' flow-matching schedulers have it, with σ = t)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muse.gen.config import FlowConfig


def sample_timesteps(batch: int, cfg: FlowConfig, generator: torch.Generator, device) -> torch.Tensor:
    """t (batch,) in (0, 1): logit-normal (sigmoid of N(mean, std²)) or uniform."""
    if cfg.timesteps == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    normal = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(model, x0: torch.Tensor, condition: dict, cfg: FlowConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Mean squared error between the model's velocity at (x_t, t) and ε − x₀, in fp32. The batch's t,
    ε and label dropout come from ``generator`` (one per step: a resumed run draws the same ones).
    ``model``: a ``LatentGenerator`` (or its DDP wrapper)."""
    batch, device = x0.shape[0], x0.device
    t = sample_timesteps(batch, cfg, generator, device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(batch, generator=generator, device=device) < cfg.label_dropout
    generator_module = model.module if hasattr(model, "module") else model
    prediction = model(interpolate(x0, noise, t), t, generator_module.drop_condition(condition, drop))
    loss = F.mse_loss(prediction.float(), velocity_target(x0, noise).float())
    return loss, {"flow": loss.detach(), "dropped": drop.float().mean()}
