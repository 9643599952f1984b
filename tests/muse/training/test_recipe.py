"""The official optimisation recipe: weight-decay groups by name, the discriminator's AdamW and its
schedule, warm-up + cosine values at chosen steps, the EMA decay schedule."""

import copy

import pytest
import torch
from torch import nn

from muse.config import OptimConfig, load_config
from muse.models import MuseTokenizer
from muse.models.discriminator import NLayerDiscriminator
from muse.training.ema import EMA, ema_decay_at
from muse.training.optim import (build_discriminator_optimizer, discriminator_schedule, lr_at, no_weight_decay,
                                 param_groups)
from muse.training.stages import configure_stage


@pytest.mark.parametrize("name,shape,decayed", [
    ("muse_blocks.1.q_topo.weight", (64, 64), True),
    ("encoder.embeddings.patch_embeddings.projection.weight", (32, 3, 4, 4), False),  # "embedding"
    ("encoder.embeddings.position_embeddings", (1, 65, 32), False),
    ("muse_blocks.0.norm1.weight", (64,), False),
    ("to_latent.bias", (8,), False),
    ("logit_scale", (), False),
    ("decoder.up_blocks.0.0.norm.weight", (8, 8), False),  # "norm", whatever its shape
    ("x.gamma", (4, 4), False), ("x.ln_1.weight", (4, 4), False), ("x.mask_token", (1, 4), False),
])
def test_official_no_decay_rule(name, shape, decayed):
    assert no_weight_decay(name, torch.empty(shape)) == (not decayed)


def test_generator_groups_on_the_tiny_model():
    torch.manual_seed(0)
    model = MuseTokenizer(load_config("tiny").model)
    configure_stage(model, 3)
    groups = param_groups(model, lr=5e-5, weight_decay=1e-4, backbone_lr_scale=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected = 0.0 if (param.dim() < 2 or any(k in name for k in ("embedding", "norm", "bias"))) else 1e-4
        assert by_name[name]["weight_decay"] == expected, name
        assert by_name[name]["lr"] == pytest.approx(2.5e-5 if name.startswith("encoder.") else 5e-5), name
    assert by_name["encoder.embeddings.patch_embeddings.projection.weight"]["weight_decay"] == 0.0


def test_discriminator_optimizer_groups_are_the_official_layout():
    disc = NLayerDiscriminator()
    optimizer = build_discriminator_optimizer(disc, lr=1e-4, weight_decay=1e-4)
    undecayed, decayed = optimizer.param_groups
    assert undecayed["weight_decay"] == 0.0 and decayed["weight_decay"] == 1e-4
    names = dict(disc.named_parameters())
    assert undecayed["names"] == [n for n, p in names.items() if p.dim() < 2]  # biases, GroupNorm affines
    assert decayed["names"] == [n for n, p in names.items() if p.dim() >= 2]  # every conv weight
    assert all(g["lr"] == 1e-4 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)


def test_warmup_from_zero_then_cosine_at_chosen_steps():
    # Official LambdaLR: step/warmup during the warm-up (step 0 at LR 0), then
    # end + (base − end)·½(1 + cos(π·progress)).
    assert lr_at(0, 4e-4, 1e-5, 2000, 50000) == 0.0
    assert lr_at(500, 4e-4, 1e-5, 2000, 50000) == pytest.approx(1e-4)
    assert lr_at(2000, 4e-4, 1e-5, 2000, 50000) == pytest.approx(4e-4)
    assert lr_at(26000, 4e-4, 1e-5, 2000, 50000) == pytest.approx(1e-5 + (4e-4 - 1e-5) / 2)
    assert lr_at(50000, 4e-4, 1e-5, 2000, 50000) == pytest.approx(1e-5)
    assert lr_at(60000, 4e-4, 1e-5, 2000, 50000) == pytest.approx(1e-5)


def test_discriminator_schedule_follows_the_official_scheduler():
    oc = load_config("muse_1b/stage3").optim
    schedule = discriminator_schedule(oc, steps=50000, disc_start=0)
    assert schedule == {"base_lr": 1e-4, "end_lr": pytest.approx(2e-6), "warmup_steps": 1000, "total_steps": 50000}
    assert lr_at(0, **schedule) == 0.0
    assert lr_at(500, **schedule) == pytest.approx(5e-5)
    assert lr_at(1000, **schedule) == pytest.approx(1e-4)
    assert lr_at(50000, **schedule) == pytest.approx(2e-6)
    # A later start shortens the cosine; explicit values replace the tied ones.
    assert discriminator_schedule(oc, 50000, 10000)["total_steps"] == 40000
    own = OptimConfig(lr=5e-5, end_lr=1e-6, disc_lr=1e-4, disc_warmup_steps=10, disc_end_lr=0.0)
    assert discriminator_schedule(own, 100, 0) == {"base_lr": 1e-4, "end_lr": 0.0, "warmup_steps": 10,
                                                   "total_steps": 100}


@pytest.fixture(autouse=True)
def _checkpoint_paths(monkeypatch):
    # Shipped muse_1b configs name local checkpoints through environment variables; any value loads.
    for name in ("MUSE_INTERNVIT_PATH", "MUSE_DINOV3_PATH", "MUSE_DCAE_PATH", "MUSE_CLIP_TEXT_PATH",
                 "MUSE_VGG16_WEIGHTS", "MUSE_CONVNEXT_WEIGHTS", "MUSE_SHARDS"):
        monkeypatch.setenv(name, f"/checkpoints/{name.lower()}")


def test_ema_decay_schedule_values():
    assert ema_decay_at(1, 0.999) == 0.0  # the first update copies the weights
    assert ema_decay_at(2, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(11, 0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(8992, 0.999) == pytest.approx(8992 / 9001)
    assert ema_decay_at(8993, 0.999) == 0.999 and ema_decay_at(50000, 0.999) == 0.999
    assert ema_decay_at(1, 0.999, warmup=False) == 0.999
    with pytest.raises(ValueError, match="counted from 1"):
        ema_decay_at(0, 0.999)


def test_ema_follows_the_schedule_and_resumes_its_count():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)  # decay 0: an exact copy
    assert torch.equal(ema.state_dict()["weight"], model.weight.detach())
    with torch.no_grad():
        model.weight.fill_(15.0)
    ema.update(model)  # decay 2/11
    torch.testing.assert_close(ema.state_dict()["weight"], torch.full((2, 3), 2 / 11 * 4 + 9 / 11 * 15))
    resumed = EMA(copy.deepcopy(model), decay=0.999)
    resumed.load_state_dict(ema.state_dict(), num_updates=ema.num_updates)
    ema.update(model)
    resumed.update(model)
    assert resumed.num_updates == 3 and torch.equal(resumed.state_dict()["weight"], ema.state_dict()["weight"])
