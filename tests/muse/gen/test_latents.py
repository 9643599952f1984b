"""muse-encode-latents: latent shards equal the tokenizer's own encode, split over ranks, with statistics."""

import json

import numpy as np
import pytest
import torch

from muse.config import load_config
from muse.data import read_once, write_shards
from muse.gen.latents import LatentDataset, load_stats, main, shard_name
from muse.models import MuseTokenizer
from muse.training.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    samples = ({"image": rng.integers(0, 255, (36 + i, 40, 3), dtype=np.uint8), "caption": f"photo {i}", "cls": i % 3}
               for i in range(7))
    write_shards(samples, root / "shards", samples_per_shard=3)
    torch.manual_seed(0)
    model = MuseTokenizer(load_config("tiny").model)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("dino_teacher.")}
    save_checkpoint({"ema": weights, "model": weights, "step": 1}, root / "run", 1)
    return root, model.eval()


def _args(root, out):
    return ["--config", "tiny", "--checkpoint", str(root / "run"), "--shards", str(root / "shards" / "shard-*.tar"),
            "--out", str(out), "--batch-size", "2", "--device", "cpu"]


def test_latent_shards_equal_encode_on_the_same_images(setup, tmp_path, monkeypatch):
    root, model = setup
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_args(root, tmp_path / "lat")) == 0
    shards = sorted((root / "shards").glob("shard-*.tar"))
    assert sorted(p.name for p in (tmp_path / "lat").glob("latents-*.pt")) == [shard_name(i) for i in range(3)]
    everything = []
    for index, shard in enumerate(shards):
        samples = list(read_once([str(shard)], 32))
        with torch.no_grad():
            direct = model.encode(torch.stack([s["image"] for s in samples]))
        part = torch.load(tmp_path / "lat" / shard_name(index), weights_only=True)
        torch.testing.assert_close(part["latents"], direct, rtol=1e-5, atol=1e-6)
        assert part["cls"].tolist() == [s["cls"] for s in samples]
        assert part["captions"] == [s["caption"] for s in samples] and part["keys"] == [s["key"] for s in samples]
        everything.append(direct.double())
    everything = torch.cat(everything)
    assert everything.shape == (7, 8, 4, 4)
    stats = load_stats(tmp_path / "lat")
    np.testing.assert_allclose(stats["mean"], everything.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["std"], everything.permute(1, 0, 2, 3).flatten(1).std(1, unbiased=False).numpy(),
                               rtol=1e-4, atol=1e-7)
    assert stats["samples"] == 7 and stats["latent_shape"] == [8, 4, 4] and stats["config"] == "tiny"
    data = LatentDataset(tmp_path / "lat")
    latents, classes = data[torch.tensor([6, 0, 4])]
    torch.testing.assert_close(latents, everything[[6, 0, 4]].float(), rtol=1e-5, atol=1e-6)
    assert classes.tolist() == [0, 0, 1] and len(data) == 7


def test_ranks_split_the_shards_and_the_last_writes_the_statistics(setup, tmp_path, monkeypatch):
    root, _ = setup
    out = tmp_path / "lat"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(_args(root, out)) == 0
    assert sorted(p.name for p in out.glob("latents-*.pt")) == [shard_name(1)] and not (out / "stats.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(_args(root, out)) == 0
    assert sorted(p.name for p in out.glob("latents-*.pt")) == [shard_name(i) for i in range(3)]
    split = json.loads((out / "stats.json").read_text())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(_args(root, tmp_path / "one")) == 0
    one = json.loads((tmp_path / "one" / "stats.json").read_text())
    np.testing.assert_allclose(split["mean"], one["mean"], rtol=1e-12)
    # A rerun keeps what is there (an interrupted extraction finishes).
    before = (out / shard_name(0)).stat().st_mtime_ns
    assert main(_args(root, out)) == 0 and (out / shard_name(0)).stat().st_mtime_ns == before
    # Shards of another tokenizer checkpoint are never mixed in.
    other = [*_args(root, out)]
    other[other.index("--checkpoint") + 1] = str(root / "run" / "step_00000001.pt")
    assert main(other) == 2 and (out / shard_name(0)).stat().st_mtime_ns == before


def test_missing_statistics_and_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent shards"):
        LatentDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="stats.json does not exist"):
        load_stats(tmp_path)
