"""Stages, optimizer groups, schedule, EMA and checkpoints of the training system."""

import copy
import math

import pytest
import torch
from torch import nn

from muse.config import load_config
from muse.models import MuseTokenizer
from muse.training.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)
from muse.training.ema import EMA
from muse.training.optim import build_optimizer, lr_at, param_groups, set_lr
from muse.training.stages import configure_stage


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MuseTokenizer(load_config("tiny").model)


@pytest.mark.parametrize("stage,trains,frozen", [
    (1, ("adapter_mlp", "muse_blocks", "to_latent", "decoder"), ("encoder", "semantic_projector", "logit_scale", "dino_teacher")),
    (2, ("muse_blocks", "semantic_projector", "logit_scale"), ("encoder", "dino_teacher")),
    (3, ("encoder", "muse_blocks", "semantic_projector"), ("dino_teacher",)),
])
def test_stage_trainable_sets_and_one_step_changes_exactly_them(tiny_model, stage, trains, frozen):
    model = copy.deepcopy(tiny_model)
    trainable = configure_stage(model, stage)
    tops = {name.split(".")[0] for name in trainable}
    assert set(trains) <= tops and not (set(frozen) & tops)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images, text_embeds=torch.randn(2, 16))
    (out.reconstruction.pow(2).mean() + out.loss_topo + out.loss_itc).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name.split(".")[0] in frozen:
            assert not changed, name
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in trainable)


def test_param_groups_no_decay_on_norms_biases_and_logit_scale(tiny_model):
    model = copy.deepcopy(tiny_model)
    configure_stage(model, 3)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["logit_scale"]["weight_decay"] == 0.0
    assert by_name["muse_blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["to_latent.bias"]["weight_decay"] == 0.0
    assert by_name["muse_blocks.1.q_topo.weight"]["weight_decay"] == 0.05
    encoder_weight = next(n for n in by_name if n.startswith("encoder.") and n.endswith("weight")
                          and by_name[n]["weight_decay"] > 0)
    assert by_name[encoder_weight]["lr"] == pytest.approx(5e-4)
    assert by_name["muse_blocks.1.q_topo.weight"]["lr"] == pytest.approx(1e-3)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.5)
    set_lr(optimizer, 2e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [pytest.approx(1e-3), pytest.approx(2e-3)]


def test_warmup_cosine_schedule():
    # Official warm-up: step / warmup_steps, so the first step runs at LR 0.
    assert lr_at(0, 1.0, 0.1, 10, 110) == 0.0
    assert lr_at(9, 1.0, 0.1, 10, 110) == pytest.approx(0.9)
    assert lr_at(10, 1.0, 0.1, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.1, 10, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_ema_tracks_and_loads_into_the_model():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["weight"], start + 1.0)
    other = nn.Linear(3, 2)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, start + 1.0)
    other.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def _toy_run(steps, directory=None, resume_from=None, stop_at=None):
    """A tiny deterministic training loop with dropout, randomness and checkpoints, for resume tests."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.9)
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"], state["ema_updates"])
        set_rng_state(state["rng"])
        start = state["step"]
    for step in range(start, steps):
        x = torch.randn(16, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        if directory is not None and stop_at is not None and step + 1 == stop_at:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "ema": ema.state_dict(), "ema_updates": ema.num_updates, "rng": rng_state(),
                             "step": step + 1}, directory, step + 1)
            return None
    return model.state_dict(), ema.state_dict()


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    uninterrupted = _toy_run(12)
    _toy_run(12, directory=tmp_path, stop_at=5)
    resumed = _toy_run(12, resume_from=latest_checkpoint(tmp_path))
    for a, b in zip(uninterrupted, resumed):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_checkpoint_write_killed_halfway_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path, 2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001.pt"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["w"], torch.ones(3))


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000005.pt"]


def test_unsupervised_blocks_topology_weights_are_frozen(tiny_model):
    """The shield keeps every loss off them: training them would only apply weight decay."""
    model = copy.deepcopy(tiny_model)
    trainable = set(configure_stage(model, 1))
    assert model.supervised == {1}
    for name in ("q_topo", "k_topo", "q_norm", "k_norm"):
        assert f"muse_blocks.0.{name}.weight" not in trainable
        assert f"muse_blocks.1.{name}.weight" in trainable
    assert "muse_blocks.0.v_sem.weight" in trainable


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_every_trainable_parameter_receives_a_gradient(tiny_model, stage):
    """What DDP needs without find_unused_parameters: no trainable parameter is left out of the graph."""
    model = copy.deepcopy(tiny_model)
    trainable = set(configure_stage(model, stage))
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1, text_embeds=torch.randn(2, 16))
    loss = out.reconstruction.mean() + out.loss_topo + (out.loss_itc if stage >= 2 else 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if n in trainable and p.grad is None]
    assert not missing, missing
    assert ("muse_blocks.1.v_itc.weight" in trainable) == (stage >= 2)
    assert "muse_blocks.0.v_itc.weight" not in trainable
