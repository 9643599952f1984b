"""Image reconstruction metrics, per image, and the streamed statistics behind rFID and the Inception Score.

Two SSIMs exist here: ``ssim`` (Wang et al.'s 11×11 Gaussian window, the fast protocol's) and
``ssim_uniform`` (scikit-image's default: 7×7 uniform window, sample covariance), which the official
evaluation calls with ``data_range=2.0`` on [0, 1] pixels — a defect that inflates the score (its
constants C1, C2 are 4× too large); the tools report that value and the correct ``data_range=1`` one
under names that say which is which.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.double().clamp(-1, 1) + 1) / 2


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB on [0, 1] pixels of [-1, 1] images, one value per image (inf
    when identical)."""
    return psnr_unit(_unit(reconstruction), _unit(target))


def psnr_unit(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of [0, 1] images (peak 1, as scikit-image infers for non-negative floats)."""
    mse = (reconstruction.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _ssim_map(x: torch.Tensor, y: torch.Tensor, blur, c1: float, c2: float, covariance_scale: float = 1.0):
    mu_x, mu_y = blur(x), blur(y)
    var_x = covariance_scale * (blur(x * x) - mu_x.pow(2))
    var_y = covariance_scale * (blur(y * y) - mu_y.pow(2))
    cov = covariance_scale * (blur(x * y) - mu_x * mu_y)
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Structural similarity of [-1, 1] images (Wang et al. 2004: 11×11 Gaussian window σ 1.5, K1 0.01,
    K2 0.03, data range 1 on [0, 1] pixels, valid region), averaged over channels and positions, one
    value per image."""
    x, y = _unit(reconstruction), _unit(target)
    channels = x.shape[1]
    kernel = _gaussian_window(window).to(x.device).expand(channels, 1, window, window)
    value = _ssim_map(x, y, lambda t: F.conv2d(t, kernel, groups=channels), 0.01**2, 0.03**2)
    return value.flatten(1).mean(1)


def ssim_uniform(reconstruction: torch.Tensor, target: torch.Tensor, data_range: float,
                 window: int = 7) -> torch.Tensor:
    """scikit-image's ``structural_similarity(..., channel_axis=-1, data_range=data_range)`` of [0, 1]
    images (B, 3, H, W): ``window``² uniform filter, sample covariance (× N/(N−1)), K1 0.01, K2 0.03,
    the mean over the positions whose window lies inside the image and over channels; one value per
    image, in float64."""
    x, y = reconstruction.double(), target.double()
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM's {window}x{window} window needs images at least that large, got "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    points = window * window
    value = _ssim_map(x, y, lambda t: F.avg_pool2d(t, window, stride=1), (0.01 * data_range) ** 2,
                      (0.03 * data_range) ** 2, covariance_scale=points / (points - 1))
    return value.flatten(1).mean(1)


class GaussianStatistics:
    """Running mean and covariance of feature rows, streamed in float64 (a 2048-d FID costs two
    2048² sums, whatever the number of images)."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        rows = features.to(self.total.device, torch.float64)
        if rows.dim() != 2 or rows.shape[1] != self.total.numel():
            raise ValueError(f"features must be (N, {self.total.numel()}), got {tuple(features.shape)}")
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.t() @ rows

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance), as the official evaluator derives them from the same sums."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.count}")
        mean = self.total / self.count
        covariance = (self.outer - torch.outer(self.total, self.total) / self.count) / (self.count - 1)
        return mean.cpu().numpy(), covariance.cpu().numpy()


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½, the square root by ``scipy.linalg.sqrtm`` as in the
    official evaluator (its imaginary part dropped when negligible; a non-finite root replaced by the
    diagonal fallback the official code uses, Σ √(diag Σa · diag Σb))."""
    from scipy import linalg

    diff = mean_a - mean_b
    root = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"the covariance product's square root has an imaginary part of "
                             f"{np.max(np.abs(root.imag)):.3g}: too few images for this feature size?")
        root = root.real
    trace_root = float(np.trace(root))
    if not np.isfinite(root).all():
        trace_root = float(np.sum(np.sqrt(np.diag(cov_a) * np.diag(cov_b))))
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


class InceptionScoreStatistics:
    """exp(mean over images of KL(p(y|x) ‖ p(y))) from class logits, over all images as one split (the
    official evaluator's; torch-fidelity's default averages 10 splits), streamed: the sums of p and of
    p·log p per class suffice."""

    def __init__(self, classes: int, device: str | torch.device = "cpu", eps: float = 1e-16):
        self.count, self.eps = 0, eps
        self.prob_total = torch.zeros(classes, dtype=torch.float64, device=device)
        self.plogp_total = torch.zeros(classes, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor) -> None:
        probabilities = logits.to(self.prob_total.device, torch.float64).softmax(dim=-1)
        self.count += probabilities.shape[0]
        self.prob_total += probabilities.sum(0)
        self.plogp_total += (probabilities * torch.log(probabilities + self.eps)).sum(0)

    def compute(self) -> float:
        if self.count < 1:
            raise ValueError("no images were scored")
        marginal = self.prob_total / self.count
        mean_kl = (self.plogp_total - self.prob_total * torch.log(marginal + self.eps)).sum() / self.count
        return math.exp(float(mean_kl))
