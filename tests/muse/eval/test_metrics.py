"""The official protocol's metrics against scikit-image and hand-computed values: both SSIMs, PSNR on
8-bit pixels, streamed Gaussian statistics, the Fréchet distance, the Inception Score."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from muse.eval.metrics import (GaussianStatistics, InceptionScoreStatistics, frechet_distance, psnr_unit,
                               ssim_uniform)


def _known_pair():
    """A 8-bit image and a noisy, darkened copy of it, as [0, 1] float64 (B, 3, H, W) tensors."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 20, 23)).astype(np.float64)
    b = np.clip(0.8 * a + rng.normal(0, 20, a.shape), 0, 255).round()
    return torch.from_numpy(a / 255), torch.from_numpy(b / 255)


def test_both_ssims_match_scikit_image():
    x, y = _known_pair()
    official = ssim_uniform(x, y, data_range=2.0)
    correct = ssim_uniform(x, y, data_range=1.0)
    for i in range(2):
        recon, real = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        # The official evaluator's call, argument for argument (channel_axis; 7×7 uniform by default).
        assert official[i].item() == pytest.approx(structural_similarity(recon, real, data_range=2.0, channel_axis=-1),
                                                   abs=1e-12)
        assert correct[i].item() == pytest.approx(structural_similarity(recon, real, data_range=1.0, channel_axis=-1),
                                                  abs=1e-12)
    # data_range 2 makes C1 and C2 four times larger, which pulls SSIM towards 1: the defect inflates it.
    assert (official > correct).all()
    torch.testing.assert_close(ssim_uniform(x, x, 1.0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="7x7 window needs images at least that large"):
        ssim_uniform(x[..., :6, :], y[..., :6, :], 1.0)


def test_psnr_on_8bit_pixels_matches_scikit_image_and_a_hand_value():
    x, y = _known_pair()
    got = psnr_unit(x, y)
    for i in range(2):
        expected = peak_signal_noise_ratio(x[i].numpy(), y[i].numpy())  # non-negative floats: peak 1
        assert got[i].item() == pytest.approx(expected, abs=1e-10)
    # Every pixel one 8-bit level off: MSE (1/255)², PSNR 20·log10(255) = 48.13 dB.
    level = torch.full((1, 3, 4, 4), 100 / 255, dtype=torch.float64)
    assert psnr_unit(level + 1 / 255, level).item() == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_streamed_statistics_equal_numpy_mean_and_covariance():
    rows = torch.randn(37, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    stats = GaussianStatistics(5)
    for chunk in rows.split(10):
        stats.update(chunk)
    mean, cov = stats.mean_and_covariance()
    np.testing.assert_allclose(mean, rows.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(rows.numpy(), rowvar=False), atol=1e-10)
    with pytest.raises(ValueError, match=r"features must be \(N, 5\)"):
        stats.update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2 feature rows"):
        GaussianStatistics(2).mean_and_covariance()


def test_frechet_distance_by_hand():
    identity = np.eye(3)
    assert frechet_distance(np.zeros(3), identity, np.zeros(3), identity) == pytest.approx(0, abs=1e-10)
    # Means apart by (1, 2, 2), same covariance: |Δμ|² = 9.
    assert frechet_distance(np.zeros(3), identity, np.array([1.0, 2, 2]), identity) == pytest.approx(9, abs=1e-9)
    # Diagonal covariances: Σ (√a − √b)² = (2 − 1)² + (3 − 1)² = 5.
    assert frechet_distance(np.zeros(2), np.diag([4.0, 9.0]), np.zeros(2), np.eye(2)) == pytest.approx(5, abs=1e-9)


def test_inception_score_of_known_distributions():
    # Confident predictions spread evenly over K classes: KL(p ‖ p̄) = log K for every image, IS = K.
    confident = torch.eye(4).repeat(3, 1) * 60  # logits: softmax is one-hot to within e⁻⁶⁰
    stats = InceptionScoreStatistics(4)
    for chunk in confident.split(5):
        stats.update(chunk)
    assert stats.compute() == pytest.approx(4.0, rel=1e-9)
    # Identical predictions: p = p̄, IS = 1 whatever p is.
    same = InceptionScoreStatistics(3)
    same.update(torch.tensor([[1.0, 2.0, 3.0]] * 4))
    assert same.compute() == pytest.approx(1.0, abs=1e-12)
    # Two images, p1 = (1, 0), p2 = (½, ½): p̄ = (¾, ¼); KL1 = log(4/3), KL2 = ½ log(2/3) + ½ log 2.
    pair = InceptionScoreStatistics(2)
    pair.update(torch.tensor([[80.0, 0.0], [0.0, 0.0]]))
    expected = math.exp((math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2)
    assert pair.compute() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="no images"):
        InceptionScoreStatistics(2).compute()
