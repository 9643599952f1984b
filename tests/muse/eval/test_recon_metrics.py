"""recon-metrics: PSNR/SSIM/rFID/IS accumulation on hand-computable cases under both protocols, the tool
end to end, deterministic, with a written-out Inception weights file."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError

from inception_layout import layout_state
from muse.data import write_shards
from muse.eval.__main__ import main as muse_eval
from muse.eval.protocols import RECON
from muse.eval import recon_metrics
from muse.eval.recon_metrics import ReconstructionMetrics, build_lpips, measure

OFFICIAL, FAST = RECON["official"], RECON["fast"]


class ChannelMeans(nn.Module):
    """A stand-in for the FID network: each uint8 image's per-channel mean in [0, 1] as the "pool"
    features, and those as class logits."""

    def forward(self, images):
        means = images.double().mean(dim=(2, 3)) / 255
        return {"pool": means, "logits_unbiased": 10 * means}


class Offset(nn.Module):
    """A 'tokenizer' whose reconstruction is its input plus a constant."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def encode(self, images):
        return images

    def decode(self, latents, size=None):
        return latents + self.offset


def _images(n, seed=0):
    """Batches of 8-bit images in [-1, 1], away from ±1 so that an offset of 0.2 is never clamped."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(40, 216, (4, 3, 16, 16), generator=gen).float() / 127.5 - 1 for _ in range(n)]


def _metrics(settings, lpips=None):
    return ReconstructionMetrics(settings, ChannelMeans(), lpips, pool_dim=3, classes=3)


@pytest.mark.parametrize("settings", [OFFICIAL, FAST])
def test_identity_reconstruction_is_perfect(settings):
    report = measure(Offset(0.0), _images(3), _metrics(settings, MeanAbsoluteError()))
    assert report["images"] == 12 and report["psnr"] == float("inf") and report["psnr_finite_mean"] is None
    assert report["ssim_data_range_1"] == pytest.approx(1.0) and report["lpips"] == 0.0
    assert ("ssim_official_data_range_2" in report) == (settings is OFFICIAL)
    if settings.inception_input == "exact":
        assert abs(report["rfid"]) < 1e-9
    else:
        # The official evaluator truncates the real and the reconstructed images' float round trips
        # differently (test_transforms): even a perfect reconstruction scores an rFID above 0.
        assert 0 < report["rfid"] < 1e-4


def test_known_offset_gives_known_scores():
    fast = measure(Offset(0.2), _images(3), _metrics(FAST, MeanAbsoluteError()))
    assert fast["psnr"] == pytest.approx(20.0)  # +0.2 in [-1, 1] is +0.1 on [0, 1]: MSE 0.1²
    assert fast["lpips"] == pytest.approx(0.2, rel=1e-5)
    # 20 levels up: the stand-in features (channel means of the uint8 images the Inception network
    # reads) all move by 20/255 and keep their covariance, FID = |Δμ|² = 3 · (20/255)²; the official
    # protocol rounds the reconstruction to 8 bits, where 20 levels stay 20: PSNR 20·log10(255/20).
    exact = measure(Offset(20 / 127.5), _images(3), _metrics(FAST))
    assert exact["rfid"] == pytest.approx(3 * (20 / 255) ** 2, rel=1e-9)
    official = measure(Offset(20 / 127.5), _images(3), _metrics(OFFICIAL))
    assert official["psnr"] == pytest.approx(20 * np.log10(255 / 20), rel=1e-9)
    # The official truncations move real and reconstructed levels by different amounts (≈ 1.5 % here).
    assert official["rfid"] == pytest.approx(exact["rfid"], rel=0.05) and official["rfid"] != exact["rfid"]
    assert official["ssim_official_data_range_2"] > official["ssim_data_range_1"]


def test_official_protocol_rounds_to_8bit_before_every_metric():
    images = torch.cat(_images(1))
    tiny_error = Offset(0.3 / 255)  # under half a level: the rounded reconstruction equals the input
    official = measure(tiny_error, [images], _metrics(OFFICIAL))
    assert official["psnr"] == float("inf") and official["ssim_data_range_1"] == pytest.approx(1.0)
    fast = measure(tiny_error, [images], _metrics(FAST))
    assert np.isfinite(fast["psnr"]) and fast["psnr"] > 50


def test_inception_inputs_follow_the_protocol():
    seen = []

    class Recorder(ChannelMeans):
        def forward(self, images):
            seen.append(images.clone())
            return super().forward(images)

    images = torch.full((2, 3, 8, 8), 1 / 127.5 - 1)  # level 1 everywhere
    for settings in (OFFICIAL, dataclasses.replace(OFFICIAL, inception_input="exact")):
        seen.clear()
        metrics = ReconstructionMetrics(settings, Recorder(), pool_dim=3, classes=3)
        metrics.update(images, images)
        real, fake = seen
        assert real.dtype == torch.uint8
        # Officially level 1 of the reconstruction becomes 0 by the float round trip; exact keeps 1.
        assert int(fake.max()) == (0 if settings.inception_input == "official_float" else 1)


def test_metrics_need_images_and_matching_shapes():
    metrics = ReconstructionMetrics(OFFICIAL)
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
    torch.save(layout_state(), root / "inception.pth")
    return root


def test_recon_metrics_tool_both_protocols(run, tmp_path, tiny_checkpoint):
    args = ["recon-metrics", "--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--shards",
            str(run / "shards" / "*.tar"), "--batch-size", "2", "--skip", "fid"]
    for name in ("a", "b"):
        assert muse_eval([*args, "--max-images", "4", "--out", str(tmp_path / name)]) == 0
    first, second = (json.loads((tmp_path / name / "recon_metrics.json").read_text()) for name in ("a", "b"))
    assert first["images"] == 4 and np.isfinite(first["psnr"]) and first["protocol"] == "official"
    assert -1 <= first["ssim_data_range_1"] < first["ssim_official_data_range_2"] <= 1
    assert "rfid" not in first and "lpips" not in first and first["settings"]["round_8bit"] is True
    assert first == second
    assert muse_eval([*args, "--protocol", "fast", "--out", str(tmp_path / "f")]) == 0
    fast = json.loads((tmp_path / "f" / "recon_metrics.json").read_text())
    assert fast["images"] == 5 and "ssim_official_data_range_2" not in fast
    assert fast["settings"]["ssim_window"] == "gaussian11"


def test_recon_metrics_tool_with_the_inception_network(run, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("MUSE_INCEPTION_WEIGHTS", raising=False)
    # The 2048-d matrix square root takes minutes on a loaded 2-core machine; the distance itself is
    # checked by hand in test_metrics. Here: the network's statistics reach it, with their shapes.
    seen = []

    def distance(mean_a, cov_a, mean_b, cov_b):
        seen.append((mean_a.shape, cov_a.shape, mean_b.shape, cov_b.shape, bool(np.allclose(mean_a, mean_b))))
        return 0.25

    monkeypatch.setattr(recon_metrics, "frechet_distance", distance)
    args = ["recon-metrics", "--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--shards",
            str(run / "shards" / "*.tar"), "--max-images", "2", "--protocol", "fast"]
    assert muse_eval([*args, "--inception-weights", str(run / "inception.pth"), "--out", str(tmp_path / "i")]) == 0
    report = json.loads((tmp_path / "i" / "recon_metrics.json").read_text())
    assert seen == [((2048,), (2048, 2048), (2048,), (2048, 2048), False)] and report["rfid"] == 0.25
    assert 1 - 1e-9 <= report["inception_score"] <= 2 + 1e-9  # two images: between 1 and 2
    # Without weights nothing is downloaded: the tool names the file it needs and writes nothing.
    assert muse_eval([*args, "--out", str(tmp_path / "none")]) == 2
    assert muse_eval([*args, "--inception-weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "none").exists() and not (tmp_path / "w").exists()
