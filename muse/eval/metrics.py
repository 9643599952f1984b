"""Image reconstruction metrics on [-1, 1] images, per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.double().clamp(-1, 1) + 1) / 2


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB on [0, 1] pixels, one value per image (inf when identical)."""
    mse = (_unit(reconstruction) - _unit(target)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004: 11×11 Gaussian window σ 1.5, K1 0.01, K2 0.03, valid
    region), averaged over channels and positions, one value per image."""
    x, y = _unit(reconstruction), _unit(target)
    channels = x.shape[1]
    kernel = _gaussian_window(window).to(x.device).expand(channels, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)
