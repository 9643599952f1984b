"""The generic training loop (muse.training.loop.TrainingRun) on a toy trainer: exact resume, the
non-finite-loss rule, and the cadence of records, pictures and checkpoints."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from muse.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from muse.training.ema import EMA
from muse.training.loop import Forward, TooManyBadSteps, TrainingRun, claim_run_folder


@dataclass
class _ToyTrain:
    out_dir: str
    steps: int = 7
    precision: str = "fp32"
    log_every: int = 2
    ckpt_every: int = 3
    keep_last: int = 0
    max_bad_steps: int = 2
    tensorboard: bool = False


@dataclass
class _ToyOptim:
    grad_clip: float = 0.5


@dataclass
class _ToyModel:
    width: int = 8


@dataclass
class _ToyConfig:
    train: _ToyTrain
    optim: _ToyOptim = field(default_factory=_ToyOptim)
    model: _ToyModel = field(default_factory=_ToyModel)


def _cfg(out_dir, **train):
    return _ToyConfig(_ToyTrain(str(out_dir), **train))


def _toy_train(cfg, resume=False, nan_steps=(), crash_at=None, media_every=3):
    """A trainer on the loop: random batches and dropout from the global RNG (so only an exact RNG
    resume repeats them), an after-step hook with its own checkpointed state, pictures."""
    claim_run_folder(Path(cfg.train.out_dir), resume, overwrite=False, main_process=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, cfg.model.width), nn.Dropout(0.3), nn.Linear(cfg.model.width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.9)
    run = TrainingRun(cfg, model, optimizer, ema, torch.device("cpu"), 0, 1, logging.getLogger("tests.toy_trainer"))
    own = {"after_steps": 0}
    state = run.resume() if resume else None
    if state is not None:
        own = state["toy"]
    seen = {"after": [], "media": [], "weights_before": None}

    def forward(step):
        if step == crash_at:
            raise KeyboardInterrupt("simulated crash")
        seen["weights_before"] = model[0].weight.detach().clone()
        x = torch.randn(5, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if step in nan_steps:
            loss = loss * float("nan")
        return Forward(loss, {"mse": loss.detach()}, x.shape[0], x)

    def after_step(step, out):
        own["after_steps"] += 1
        seen["after"].append((step, ema.num_updates, torch.equal(seen["weights_before"], model[0].weight)))
        return {"after_steps": torch.tensor(float(own["after_steps"]))}

    def media(done, out):
        seen["media"].append(done)

    run.loop(forward, lambda step: 1e-2 / (1 + step), desc="toy", after_step=after_step, media=media,
             media_every=media_every, extra_state=lambda: {"toy": dict(own)})
    return run, seen


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path):
    _toy_train(_cfg(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        _toy_train(_cfg(tmp_path / "split"), crash_at=4)  # after the step-3 checkpoint and step 4's record
    assert latest_checkpoint(tmp_path / "split").name == "step_00000003.pt"
    assert [r["step"] for r in _records(tmp_path / "split")] == [1, 2, 4]
    run, _ = _toy_train(_cfg(tmp_path / "split"), resume=True)
    assert run.start == 3 and run.summary()["checkpoint"] == str(tmp_path / "split" / "step_00000007.pt")
    full, split = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("full", "split"))
    assert full["step"] == split["step"] == 7 and full["ema_updates"] == split["ema_updates"] == 7
    assert full["toy"] == split["toy"] == {"after_steps": 7}  # the trainer's own state, through extra_state
    for section in ("model", "ema"):
        for key, value in full[section].items():
            assert torch.equal(value, split[section][key]), f"{section}.{key}"
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(full["optimizer"]["state"][0][moment], split["optimizer"]["state"][0][moment])
    assert torch.equal(full["rng"]["torch"], split["rng"]["torch"])
    # The step-4 record of the interrupted run was dropped: each step is logged once, with equal values.
    strip = [[{k: v for k, v in r.items() if k != "img_per_s"} for r in _records(tmp_path / d)] for d in ("full", "split")]
    assert strip[0] == strip[1] and [r["step"] for r in strip[0]] == [1, 2, 4, 6, 7]


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, caplog):
    run, seen = _toy_train(_cfg(tmp_path / "one"), nan_steps={1})
    assert [step for step, _, _ in seen["after"]] == [0, 2, 3, 4, 5, 6]  # step 1 made no update
    state = load_checkpoint(latest_checkpoint(tmp_path / "one"))
    assert state["bad_steps"] == run.bad_steps == 1 and state["ema_updates"] == 6
    assert [(r["step"], r["bad_steps"]) for r in _records(tmp_path / "one")] == [(1, 0), (4, 1), (6, 1), (7, 1)]
    assert "step 1: non-finite loss ({'mse': nan}), step skipped (1 in a row)" in caplog.text

    with pytest.raises(TooManyBadSteps, match=r"3 non-finite losses in a row \(train.max_bad_steps=2\); stopping\. "
                                              r"The last good checkpoint in .*many is intact"):
        _toy_train(_cfg(tmp_path / "many"), nan_steps={4, 5, 6})
    assert [p.name for p in list_checkpoints(tmp_path / "many")] == ["step_00000003.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path / "many"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_records_pictures_and_checkpoints_follow_their_cadence(tmp_path, caplog):
    caplog.set_level("INFO", "tests.toy_trainer")
    run, seen = _toy_train(_cfg(tmp_path / "run"))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [f"step_{s:08d}.pt" for s in (3, 6, 7)]
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 4, 6, 7]  # the first, every log_every, the last
    assert list(records[0]) == ["step", "lr", "img_per_s", "grad_norm", "bad_steps", "mse", "after_steps"]
    assert [r["lr"] for r in records] == [1e-2 / r["step"] for r in records]  # the step's own rate
    assert run.history == records and seen["media"] == [3, 6, 7]
    state = load_checkpoint(tmp_path / "run" / "step_00000006.pt")
    assert set(state) == {"model", "optimizer", "ema", "ema_updates", "scaler", "step", "rng", "bad_steps", "toy",
                          "config", "config_hash"}
    assert state["step"] == 6 and state["config"]["train"]["ckpt_every"] == 3
    # after_step runs once the optimizer has stepped and the EMA has taken this step's weights.
    assert all(ema_updates == step + 1 and not unchanged for step, ema_updates, unchanged in seen["after"])
    # The progress lines are the trainer's (its logger), with ETA, and name each checkpoint.
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.toy_trainer"]
    assert lines[0].startswith("step 1/7: ") and "mse " in lines[0] and "ETA " in lines[0]
    assert f"step 7/7: checkpoint {tmp_path / 'run' / 'step_00000007.pt'}" in lines
    _toy_train(_cfg(tmp_path / "kept", keep_last=2, steps=9), media_every=0)
    assert [p.name for p in list_checkpoints(tmp_path / "kept")] == ["step_00000006.pt", "step_00000009.pt"]


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    _toy_train(_cfg(tmp_path / "run", steps=3))
    wider = _cfg(tmp_path / "run", steps=6)
    wider.model.width = 16
    with pytest.raises(ValueError, match=r"model\.width: checkpoint 8, config 16"):
        _toy_train(wider, resume=True)
