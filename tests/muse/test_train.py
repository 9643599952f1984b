"""The training loop on tiny shards: every stage, exact resume, non-finite losses, config errors."""

import numpy as np
import pytest
import torch

import muse.train as train_module
from muse.config import load_config
from muse.data import write_shards
from muse.train import TooManyBadSteps, main, train
from muse.training.checkpoint import latest_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    samples = ({"image": rng.integers(0, 255, (48, 40 + 3 * i, 3), dtype=np.uint8), "caption": f"a photo number {i}"}
               for i in range(6))
    write_shards(samples, out, samples_per_shard=3)
    return str(out / "shard-*.tar")


def _cfg(stage, shards, out_dir, steps=3, extra=()):
    return load_config(f"tiny/stage{stage}", [f"data.shards=['{shards}']", f"train.out_dir={out_dir}",
                                               f"train.steps={steps}", "train.ckpt_every=3", "train.log_every=1",
                                               "data.batch_size=2", *extra])


def test_three_stages_train_the_right_parameters(shards, tmp_path, monkeypatch):
    trained = {}
    original_configure = train_module.configure_stage

    def spy(model, stage):
        names = original_configure(model, stage)
        trained[stage] = (model, {n: p.detach().clone() for n, p in model.named_parameters()}, set(names))
        return names

    monkeypatch.setattr(train_module, "configure_stage", spy)
    previous = None
    for stage in (1, 2, 3):
        extra = [f"train.init_weight={previous}"] if previous else ["train.init_weight=null"]
        summary = train(_cfg(stage, shards, tmp_path / f"s{stage}", extra=extra))
        assert all(np.isfinite(r["total"]) for r in summary["history"])
        model, before, names = trained[stage]
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        assert changed and changed <= names, sorted(changed - names)[:5]
        assert not any(n.startswith("dino_teacher.") for n in changed)
        assert any(n.startswith("encoder.") for n in changed) == (stage == 3)
        assert any(n.startswith("semantic_projector.") for n in changed) == (stage >= 2)
        previous = summary["out_dir"]
    state = load_checkpoint(latest_checkpoint(previous))
    assert state["stage"] == 3 and "discriminator" in state and not any(k.startswith("dino_teacher.") for k in state["model"])


@pytest.mark.parametrize("precision,workers", [("fp32", 0), ("fp16", 0), ("fp32", 2)])
def test_interrupted_and_resumed_run_ends_bitwise_equal(shards, tmp_path, monkeypatch, precision, workers):
    # fp16: autocast with a GradScaler, whose state is resumed too. Two loader workers: the crash comes
    # after an odd number of batches, so the resumed loader must start with the second worker's part.
    extra = [f"train.precision={precision}", f"data.num_workers={workers}"]
    train(_cfg(1, shards, tmp_path / "full", steps=6, extra=extra))
    original_lr = train_module.lr_at

    def crash_at_step_4(step, *args):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original_lr(step, *args)

    monkeypatch.setattr(train_module, "lr_at", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(1, shards, tmp_path / "split", steps=6, extra=extra))
    monkeypatch.setattr(train_module, "lr_at", original_lr)
    assert latest_checkpoint(tmp_path / "split").name == "step_00000003.pt"
    train(_cfg(1, shards, tmp_path / "split", steps=6, extra=extra), resume=True)
    full, split = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("full", "split"))
    assert full["step"] == split["step"] == 6
    assert full["scaler"] == split["scaler"]
    if precision == "fp16":
        assert full["scaler"]["scale"] == 65536.0 and full["scaler"]["_growth_tracker"] == 6  # no overflow
        assert all(v.dtype == torch.float32 for v in full["model"].values() if v.is_floating_point())
    for section in ("model", "ema"):
        for key, value in full[section].items():
            assert torch.equal(value, split[section][key]), f"{section}.{key}"


def test_non_finite_losses_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    original = train_module.MuseLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        calls["n"] += 1
        return (total * float("nan"), terms) if calls["n"] in (2,) or calls["n"] >= 5 else (total, terms)

    monkeypatch.setattr(train_module.MuseLoss, "forward", sometimes_nan)
    with pytest.raises(TooManyBadSteps, match="non-finite losses in a row"):
        train(_cfg(1, shards, tmp_path / "nan", steps=20, extra=["train.max_bad_steps=2"]))
    state = load_checkpoint(latest_checkpoint(tmp_path / "nan"))
    assert state["step"] == 3 and state["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("args,message", [
    (["--config", "tiny/stage1", "train.stpes=3"], "unknown config key(s) train.stpes"),
    (["--config", "tiny/stage1", "train.steps=many"], "train.steps must be int"),
    (["--config", "nope/stage9"], "no config 'nope/stage9'"),
])
def test_config_errors_are_clear(args, message, caplog):
    assert main(args) == 2
    assert message in caplog.text


def test_missing_shards_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        train(_cfg(1, str(tmp_path / "none-*.tar"), tmp_path / "run"))


def _ddp_worker(rank, world, port, cfg, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary = train(cfg)
    state = {k: v for k, v in summary["model"].state_dict().items() if not k.startswith("dino_teacher.")}
    if summary["discriminator"] is not None:
        state |= {f"discriminator.{k}": v for k, v in summary["discriminator"].state_dict().items()}
    torch.save(state, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _run_two_ranks(cfg, out):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_process_gloo_ddp_keeps_ranks_identical(shards, tmp_path):
    # Stage 3 also exercises the discriminator: built by each rank, its gradients averaged by hand.
    cfg = _cfg(3, shards, tmp_path / "ddp", steps=2, extra=["train.init_weight=null"])
    ranks = _run_two_ranks(cfg, tmp_path)
    start = train_module.MuseTokenizer(cfg.model).state_dict()
    assert any(k.startswith("discriminator.") for k in ranks[0])
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    assert any(not torch.equal(v, start[k]) for k, v in ranks[0].items() if k.startswith("muse_blocks."))


class _CombinedBatches:
    """What the two DDP ranks read, concatenated into one batch per step, for a single process."""

    def __init__(self, cfg, per_rank):
        from muse.data import ShardStream, Source, collate, expand_shards

        streams = [iter(ShardStream([Source(expand_shards(cfg.data.shards[0]))], cfg.model.image_size,
                                    seed=cfg.train.seed, rank=r, world_size=2, shuffle_size=cfg.data.shuffle_buffer,
                                    shuffle_initial=cfg.data.shuffle_initial)) for r in range(2)]
        self.per_rank, self.collate, self.streams = per_rank, collate, streams

    def __iter__(self):
        while True:
            parts = [self.collate([next(s) for _ in range(self.per_rank)]) for s in self.streams]
            yield {"images": torch.cat([p["images"] for p in parts]), "captions": sum((p["captions"] for p in parts), []),
                   "cls": torch.cat([p["cls"] for p in parts]), "positions": parts[0]["positions"] | parts[1]["positions"]}


def test_ddp_equals_one_process_on_the_combined_batch(shards, tmp_path, monkeypatch):
    # Stage 1's losses are means over images: DDP's average of two half-batch gradients is the
    # full batch's gradient, so two ranks of 2 images train like one process of 4 (up to float
    # summation order).
    cfg = _cfg(1, shards, tmp_path / "ddp_pos", steps=2)
    ranks = _run_two_ranks(cfg, tmp_path)
    positions = load_checkpoint(latest_checkpoint(tmp_path / "ddp_pos"))["positions"]
    assert set(positions) == {0, 1} and all(sum(p["consumed"]) >= 4 for p in positions.values())  # every rank's position

    single = _cfg(1, shards, tmp_path / "single", steps=2, extra=["data.batch_size=4"])
    combined = _CombinedBatches(cfg, per_rank=2)
    monkeypatch.setattr(train_module, "build_loader", lambda *args: (combined, combined))
    model = train(single)["model"]
    start = train_module.MuseTokenizer(cfg.model).state_dict()
    moved = 0
    for key, value in model.state_dict().items():
        if key.startswith("dino_teacher."):
            continue
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += not torch.equal(value, start[key])
    assert moved > 10


def test_pictures_tensorboard_and_gradient_orthogonality_are_logged(shards, tmp_path):
    import json

    cfg = _cfg(2, shards, tmp_path / "logs", steps=2, extra=["train.init_weight=null", "train.image_every=2",
                                                            "train.ortho_every=2"])
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "logs" / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    # The trainable Q/K are the supervised block's: neither reconstruction nor ITC reaches them, so
    # their cosines with the topology loss are exactly 0. (V of earlier blocks does feed the topology
    # loss through the residual stream, so the V cosine is a real measurement.)
    assert last["cos/rec|topo/qk"] == 0.0 and last["cos/topo|itc/qk"] == 0.0
    assert -1.0 <= last["cos/rec|topo/v"] <= 1.0 and "cos/topo|itc/rest" in last
    pictures = sorted(p.name for p in (tmp_path / "logs" / "images").iterdir())
    assert pictures == ["step_00000002_attention.png", "step_00000002_reconstruction.png"]
    assert list((tmp_path / "logs" / "tensorboard").iterdir())


# ------------------------------------------------------------ runs that never mix, hang or lie (issue 16)

def _quick(stage, shards, out_dir, steps=3, extra=()):
    # These tests are about folders, checkpoints and logs: the perceptual networks (random VGG16 and
    # ConvNeXt-S, seconds to build), pictures and gradient cosines would only slow them down.
    return _cfg(stage, shards, out_dir, steps, ["loss.perceptual=0", "train.image_every=0", "train.ortho_every=0",
                                                "train.tensorboard=false", *extra])


def _steps_logged(out_dir):
    import json

    return [json.loads(line)["step"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_used_folder_stops_and_overwrite_moves_the_old_run_aside(shards, tmp_path, caplog):
    run = tmp_path / "run"
    train(_quick(1, shards, run, steps=6))
    # A fresh run used to overwrite same-numbered checkpoints, report the old run's step-6 checkpoint
    # as its result and append to its log.
    with pytest.raises(RuntimeError, match=r"already holds a run .*--resume to continue .*--overwrite"):
        train(_quick(1, shards, run, steps=3))
    assert main(["--config", "tiny/stage1", f"data.shards=['{shards}']", f"train.out_dir={run}"]) == 2
    assert "already holds a run" in caplog.text
    summary = train(_quick(1, shards, run, steps=3), overwrite=True)
    assert summary["checkpoint"] == str(run / "step_00000003.pt")
    assert [p.name for p in run.glob("step_*.pt")] == ["step_00000003.pt"] and _steps_logged(run) == [1, 2, 3]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert sorted(p.name for p in aside.glob("step_*.pt")) == ["step_00000003.pt", "step_00000006.pt"]
    assert _steps_logged(aside) == [1, 2, 3, 4, 5, 6]


def test_checkpoints_record_their_config_and_resume_or_init_refuse_a_mismatch(shards, tmp_path):
    run = tmp_path / "run"
    train(_quick(1, shards, run, steps=3))
    state = load_checkpoint(latest_checkpoint(run))
    assert state["config"]["model"]["dim"] == 64 and state["config"]["train"]["stage"] == 1
    assert len(state["config_hash"]) == 64
    # Two encoder heads or four: the same weight shapes, so this used to resume silently.
    with pytest.raises(ValueError, match=r"model\.encoder\.num_heads: checkpoint 2, config 4"):
        train(_quick(1, shards, run, steps=6, extra=["model.encoder.num_heads=4"]), resume=True)
    with pytest.raises(ValueError, match=r"train\.stage: checkpoint 1, config 2"):
        train(_quick(2, shards, run, steps=6, extra=["train.init_weight=null"]), resume=True)
    with pytest.raises(ValueError, match=r"train.init_weight .* different config \(model\.encoder\.num_heads: checkpoint 2, config 4"):
        train(_quick(2, shards, tmp_path / "s2", extra=[f"train.init_weight={run}", "model.encoder.num_heads=4"]))


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(shards, tmp_path, caplog):
    run = tmp_path / "run"
    train(_quick(1, shards, run, steps=6))
    damaged = run / "step_00000006.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a truncated file
    summary = train(_quick(1, shards, run, steps=6), resume=True)
    assert "step_00000006.pt cannot be read" in caplog.text and "falling back" in caplog.text
    assert (run / "step_00000006.pt.damaged").exists() and summary["checkpoint"] == str(damaged)
    assert load_checkpoint(damaged)["step"] == 6
    assert _steps_logged(run) == [1, 2, 3, 4, 5, 6]  # the steps after the checkpoint are not logged twice


def test_progress_is_logged_without_a_terminal(shards, tmp_path, caplog):
    caplog.set_level("INFO", "muse.train")
    train(_quick(1, shards, tmp_path / "run", steps=3))  # pytest's stderr is no terminal: no bar is drawn
    lines = [r.getMessage() for r in caplog.records if r.name == "muse.train"]
    steps = [line for line in lines if line.startswith("step ") and "img/s" in line]
    assert len(steps) == 3 and steps[0].startswith("step 1/3") and "ETA" in steps[0] and "total" in steps[0]
    assert any("checkpoint" in line and "step_00000003.pt" in line for line in lines)


def test_shards_without_a_decodable_sample_stop_the_run_in_seconds(tmp_path):
    import io
    import tarfile

    from tests.helpers import run_within

    with tarfile.open(tmp_path / "broken-000000.tar", "w") as tar:
        for name, data in (("000.jpg", b"not a jpeg"), ("000.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # This used to print "skipped" lines forever.
    with pytest.raises(ValueError, match="could not be decoded .*broken-000000.tar"):
        run_within(60, train, _quick(1, str(tmp_path / "broken-*.tar"), tmp_path / "run"))
