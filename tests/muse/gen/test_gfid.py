"""gFID: known distances through a stand-in feature network; muse-eval gfid end to end on tiny models."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import muse.gen.gfid as gfid
from muse.eval.__main__ import main as muse_eval
from muse.eval.metrics import frechet_distance


class StandIn(torch.nn.Module):
    """Features: each channel's mean over the four 8×8 quadrants (12 numbers, linear in the pixels),
    so a uniform shift of k levels moves every feature by exactly k."""

    def __init__(self):
        super().__init__()
        self.head = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, images):
        assert images.dtype == torch.uint8
        pool = F.avg_pool2d(images.double(), 8).flatten(1)
        return {"pool": pool, "logits_unbiased": pool @ self.head / 100}


def _images(count=40, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(20, 200, (count, 3, 16, 16), dtype=np.uint8))


def _to_pixels(levels):
    return levels.float() / 127.5 - 1


def _write(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


def test_identical_sets_score_zero_and_a_shift_scores_its_squared_length(tmp_path):
    net, images = StandIn(), _images()
    _write(tmp_path / "real", images)
    ref_mean, ref_cov = gfid.folder_statistics(tmp_path / "real", net, 16, batch_size=7)
    mean, cov, score, count = gfid.generated_statistics([_to_pixels(images[:25]), _to_pixels(images[25:])], net)
    assert count == 40 and score >= 1
    assert frechet_distance(ref_mean, ref_cov, mean, cov) == pytest.approx(0.0, abs=1e-6)
    shifted = gfid.generated_statistics([_to_pixels(images + 10)], net)
    np.testing.assert_allclose(shifted[1], cov, atol=1e-9)  # the same spread, moved
    # |Δμ|² = 12 features × 10² (the covariances cancel).
    assert frechet_distance(ref_mean, ref_cov, shifted[0], shifted[1]) == pytest.approx(1200.0, rel=1e-6)
    other = gfid.generated_statistics([_to_pixels(_images(seed=1))], net)
    assert frechet_distance(ref_mean, ref_cov, other[0], other[1]) > 1.0  # another sample of the same law: > 0


def test_reference_statistics_from_an_npz(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    loaded = gfid.load_reference_npz(tmp_path / "ref.npz")
    assert np.array_equal(loaded[0], mu) and np.array_equal(loaded[1], sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="has no mu, sigma"):
        gfid.load_reference_npz(tmp_path / "bad.npz")


def test_reference_images_are_centre_cropped_and_resized(tmp_path):
    (tmp_path / "real" / "class_a").mkdir(parents=True)
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "real" / "class_a" / "wide.png")
    (image,) = list(gfid.reference_images(tmp_path / "real", 16))
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and image[:, 8, 8].tolist() == [10, 20, 30]
    with pytest.raises(FileNotFoundError, match="no images"):
        list(gfid.reference_images(tmp_path / "nothing", 16))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny tokenizer and a random tiny generator saved as runs, and Inception weights of the
    FID layout."""
    from muse.config import load_config
    from muse.gen.config import load_gen_config
    from muse.gen.model import LatentGenerator
    from muse.models import MuseTokenizer
    from muse.training.checkpoint import config_record, save_checkpoint

    sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
    from inception_layout import layout_state

    root = tmp_path_factory.mktemp("gfid")
    torch.manual_seed(0)
    tokenizer = MuseTokenizer(load_config("tiny").model)
    weights = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("dino_teacher.")}
    save_checkpoint({"ema": weights, "model": weights, "step": 1}, root / "tokenizer", 1)
    cfg = load_gen_config("gen/tiny", ["tokenizer.config=tiny", f"tokenizer.checkpoint={root / 'tokenizer'}",
                                       "model.num_classes=3"])
    generator = LatentGenerator(cfg.model)
    save_checkpoint({"model": generator.state_dict(), "ema": generator.state_dict(), "step": 1, **config_record(cfg)},
                    root / "generator", 1)
    torch.save(layout_state(), root / "inception.pth")
    _write(root / "real", _images(3))
    return root


def test_gfid_tool_end_to_end(models, tmp_path, monkeypatch):
    # The 2048-d matrix square root takes minutes on a loaded 2-core machine; the distance is checked
    # above. Here: the network's statistics of both sets reach it, with their shapes.
    seen = []

    def distance(mean_a, cov_a, mean_b, cov_b):
        seen.append((mean_a.shape, cov_a.shape, mean_b.shape, cov_b.shape))
        return 7.5

    monkeypatch.setattr(gfid, "frechet_distance", distance)
    args = ["gfid", "--generator", str(models / "generator"), "--classes", "0", "2", "--per-class", "2",
            "--steps", "2", "--cfg-scale", "1.5", "--reference", str(models / "real"), "--batch-size", "3",
            "--inception-weights", str(models / "inception.pth"), "--inception-dtype", "float32", "--device", "cpu",
            "--save-reference", str(tmp_path / "ref.npz")]
    assert muse_eval([*args, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "gfid.json").read_text())
    assert seen == [((2048,), (2048, 2048), (2048,), (2048, 2048))] and report["gfid"] == 7.5
    assert report["samples"] == 4 and report["classes"] == 2 and report["image_size"] == 32
    assert 1 - 1e-9 <= report["inception_score"] <= 4 + 1e-9 and report["cfg_scale"] == 1.5
    saved = np.load(tmp_path / "ref.npz")
    assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048)
    assert muse_eval([*args[:-2], "--classes", "5", "--out", str(tmp_path / "b")]) == 2
    assert muse_eval([a for a in args if a != str(models / "inception.pth") and a != "--inception-weights"]
                     + ["--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
