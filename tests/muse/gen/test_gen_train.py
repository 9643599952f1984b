"""muse-train-gen: exact resume, the run folder and checkpoint rules of muse.train, batches, DDP, grids."""

import json

import pytest
import torch

import muse.gen.train as gen_train
from muse.gen.config import load_gen_config
from muse.gen.latents import compute_stats, shard_name
from muse.gen.train import batch_indices, main, train
from muse.training.checkpoint import latest_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Two latent shards of the tiny tokenizer's shape (8 × 4 × 4), classes 0..3, written as the
    extraction writes them."""
    folder = tmp_path_factory.mktemp("latents")
    generator = torch.Generator().manual_seed(0)
    for index, count in enumerate((7, 6)):
        values = torch.randn(count, 8, 4, 4, generator=generator) * 0.5 + 1.0
        doubled = values.double()
        torch.save({"latents": values, "cls": torch.arange(count) % 4, "captions": [""] * count, "keys": [],
                    "count": count * 16, "sum": doubled.sum((0, 2, 3)), "sum_sq": (doubled ** 2).sum((0, 2, 3))},
                   folder / shard_name(index))
    compute_stats(folder)
    return folder


def _cfg(latents, out_dir, steps=4, extra=()):
    return load_gen_config("gen/tiny", [f"data.latents={latents}", f"train.out_dir={out_dir}", f"train.steps={steps}",
                                        "train.ckpt_every=2", "train.log_every=1", "data.batch_size=4",
                                        "sample.every=0", "model.num_classes=4", *extra])


def test_interrupted_and_resumed_run_ends_bitwise_equal(latents, tmp_path, monkeypatch):
    extra = ["train.precision=fp32"]
    full = train(_cfg(latents, tmp_path / "full", extra=extra))
    original_lr = gen_train.lr_at

    def crash_at_step_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return original_lr(step, *args)

    monkeypatch.setattr(gen_train, "lr_at", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(latents, tmp_path / "split", extra=extra))
    monkeypatch.setattr(gen_train, "lr_at", original_lr)
    assert latest_checkpoint(tmp_path / "split").name == "step_00000002.pt"
    train(_cfg(latents, tmp_path / "split", extra=extra), resume=True)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("full", "split"))
    assert a["step"] == b["step"] == 4 and a["ema_updates"] == b["ema_updates"] == 4
    for section in ("model", "ema"):
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), f"{section}.{key}"
    start = gen_train.LatentGenerator(_cfg(latents, tmp_path).model).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in a["model"].items() if k.startswith("transformer."))
    # The extraction's statistics travel in the checkpoint: sampling needs no latent folder.
    stats = json.loads((latents / "stats.json").read_text())
    torch.testing.assert_close(a["model"]["latent_mean"], torch.tensor(stats["mean"]))
    assert [r["step"] for r in full["history"]] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["flow"])) for r in full["history"])


def test_run_folder_and_checkpoint_rules_are_the_tokenizers(latents, tmp_path, caplog):
    run = tmp_path / "run"
    train(_cfg(latents, run))
    with pytest.raises(RuntimeError, match="already holds a run"):
        train(_cfg(latents, run))
    assert main(["--config", "gen/tiny", f"data.latents={latents}", f"train.out_dir={run}", "model.num_classes=4"]) == 2
    with pytest.raises(ValueError, match=r"model\.num_layers: checkpoint 2, config 3"):
        train(_cfg(latents, run, extra=["model.num_layers=3"]), resume=True)
    damaged = run / "step_00000004.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    summary = train(_cfg(latents, run), resume=True)  # falls back to step 2 and redoes 3..4
    assert "falling back" in caplog.text and (run / "step_00000004.pt.damaged").exists()
    assert summary["checkpoint"] == str(damaged) and load_checkpoint(damaged)["step"] == 4
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    summary = train(_cfg(latents, run, steps=2), overwrite=True)
    assert [p.name for p in run.glob("step_*.pt")] == ["step_00000002.pt"]
    assert any(p.name.startswith("run.old-") for p in tmp_path.iterdir())


def test_batches_cover_every_sample_once_per_pass_and_ranks_are_disjoint():
    size, batch, world = 13, 3, 2
    seen = torch.cat([batch_indices(step, size, batch, rank, world, seed=0) for step in range(4) for rank in range(2)])
    assert sorted(seen[:13].tolist()) == list(range(13))  # the first pass, whatever the batch boundaries
    ranks = [batch_indices(1, size, batch, r, world, 0) for r in range(2)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert torch.equal(batch_indices(3, size, batch, 1, world, 0), batch_indices(3, size, batch, 1, world, 0))
    assert not torch.equal(batch_indices(0, size, 13, 0, 1, 0), batch_indices(1, size, 13, 0, 1, 0))


def test_data_that_does_not_fit_the_model_is_refused(latents, tmp_path):
    with pytest.raises(ValueError, match=r"holds \[8, 4, 4\] latents, the model reads \[16, 4, 4\]"):
        train(_cfg(latents, tmp_path / "a", extra=["model.latent_channels=16"]))
    with pytest.raises(ValueError, match="class ids up to 3, model.num_classes is 2"):
        train(_cfg(latents, tmp_path / "b", extra=["model.num_classes=2"]))


def _ddp_worker(rank, world, port, cfg, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary = train(cfg)
    torch.save(summary["model"].state_dict(), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_keeps_ranks_identical(latents, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(latents, tmp_path / "ddp", steps=1)
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key


def test_sample_grids_are_written_with_the_configured_tokenizer(latents, tmp_path, monkeypatch):
    from muse.config import load_config
    from muse.models import MuseTokenizer
    from muse.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tokenizer = MuseTokenizer(load_config("tiny").model)
    weights = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("dino_teacher.")}
    save_checkpoint({"ema": weights, "model": weights, "step": 1}, tmp_path / "tok", 1)
    # bf16 autocast on the CPU as on a GPU: the loss stays finite and the grids are drawn.
    cfg = _cfg(latents, tmp_path / "grids", steps=2, extra=["train.precision=bf16", "sample.every=2", "sample.steps=2", "sample.classes=[0, 3]",
                                                           "tokenizer.config=tiny", f"tokenizer.checkpoint={tmp_path / 'tok'}"])
    summary = train(cfg)
    assert all(torch.isfinite(torch.tensor(r["flow"])) for r in summary["history"])
    from PIL import Image

    grid = Image.open(tmp_path / "grids" / "samples" / "step_00000002.png")
    assert grid.size == (4 * 32 * 4, 2 * 32 * 4)  # 2 classes × 4 samples of 32 px, enlarged ×4
