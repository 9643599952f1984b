"""recon-metrics: PSNR/SSIM/LPIPS/rFID accumulation on hand-computable cases, the tool end to end."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError
from torchmetrics.image.fid import FrechetInceptionDistance

from muse.data import write_shards
from muse.eval.__main__ import main as muse_eval
from muse.eval.recon_metrics import ReconstructionMetrics, build_lpips, measure


class ChannelMeans(nn.Module):
    """A stand-in FID feature network: each image's per-channel mean."""

    num_features = 3

    def forward(self, images):
        return images.float().mean(dim=(2, 3))


class Offset(nn.Module):
    """A 'tokenizer' whose reconstruction is its input plus a constant."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents + self.offset


def _images(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Away from ±1 so that an offset of 0.2 is never clamped.
    return [torch.rand(4, 3, 16, 16, generator=gen) * 1.2 - 0.6 for _ in range(n)]


def test_identity_reconstruction_is_perfect():
    metrics = ReconstructionMetrics(lpips=MeanAbsoluteError(), fid=FrechetInceptionDistance(feature=ChannelMeans()))
    report = measure(Offset(0.0), _images(3), metrics)
    assert report["images"] == 12 and report["psnr"] == float("inf") and report["psnr_finite_mean"] is None
    assert report["ssim"] == pytest.approx(1.0) and report["lpips"] == 0.0
    assert abs(report["rfid"]) < 1e-6


def test_known_offset_gives_known_scores():
    metrics = ReconstructionMetrics(lpips=MeanAbsoluteError(), fid=FrechetInceptionDistance(feature=ChannelMeans()))
    report = measure(Offset(0.2), _images(3), metrics)
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01 → 20 dB. The FID features (channel means of [0, 1]
    # images) all move by 0.1 and keep their covariance: FID = |Δμ|² = 3 · 0.1².
    assert report["psnr"] == pytest.approx(20.0)
    assert report["lpips"] == pytest.approx(0.2, rel=1e-5)
    assert report["rfid"] == pytest.approx(3 * 0.1**2, rel=1e-4)


def test_metrics_need_images_and_matching_shapes():
    metrics = ReconstructionMetrics()
    with pytest.raises(ValueError, match="no images were measured"):
        metrics.compute()
    with pytest.raises(ValueError, match="differ"):
        metrics.update(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="LPIPS's backbone needs torchvision")
def test_torchmetrics_lpips_of_identical_images_is_zero():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    try:
        lpips = build_lpips("alex")
    except Exception as err:  # noqa: BLE001 - offline without the backbone's cached weights
        pytest.skip(f"LPIPS backbone weights unavailable offline: {err}")
    lpips.update(x, x)
    assert float(lpips.compute()) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    rng = np.random.default_rng(0)
    write_shards(({"image": rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "caption": ""} for _ in range(5)),
                 root / "shards", samples_per_shard=3)
    return root


def test_recon_metrics_tool(run, tmp_path, tiny_checkpoint):
    args = ["recon-metrics", "--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--shards",
            str(run / "shards" / "*.tar"), "--batch-size", "2"]
    assert muse_eval([*args, "--skip", "lpips", "--skip", "fid", "--max-images", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "recon_metrics.json").read_text())
    assert report["images"] == 4 and np.isfinite(report["psnr"]) and -1 <= report["ssim"] <= 1
    assert "rfid" not in report and "lpips" not in report
    if importlib.util.find_spec("torch_fidelity") is None:  # the missing dependency is named, nothing written
        assert muse_eval([*args, "--skip", "lpips", "--out", str(tmp_path / "fid")]) == 2
        assert not (tmp_path / "fid").exists()
    assert muse_eval([*args, "--skip", "lpips", "--inception-weights", str(tmp_path / "missing.pth"),
                      "--out", str(tmp_path / "w")]) == 2
