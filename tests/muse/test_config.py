"""Shipped configs: every one loads, the official stages carry SPEC §4's values, the paper variants
differ from them exactly where Table 9 does."""

import dataclasses
import re

import pytest

from muse.config import CONFIG_DIR, load_config, shipped_configs


@pytest.fixture(autouse=True)
def checkpoint_folders(monkeypatch, tmp_path):
    """The official configs name their checkpoints through environment variables, which must be set."""
    for name in sorted({m for f in CONFIG_DIR.rglob("*.yaml") for m in re.findall(r"\$\{(\w+)\}", f.read_text())}):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def test_an_unset_checkpoint_variable_is_an_error_naming_it(monkeypatch):
    monkeypatch.delenv("MUSE_INTERNVIT_PATH")
    with pytest.raises(ValueError, match=r"model.encoder.pretrained is '\$\{MUSE_INTERNVIT_PATH\}' but the "
                                         r"environment variable MUSE_INTERNVIT_PATH is not set"):
        load_config("muse_1b/stage1")
    # Asking for random weights instead is explicit, and then the variable is not needed.
    cfg = load_config("muse_1b/stage1", ["model.encoder.random_init=true"])
    assert cfg.model.encoder.pretrained is None and cfg.model.encoder.random_init


def test_a_part_with_neither_weights_nor_random_init_is_refused():
    from muse.models import MuseTokenizer

    cfg = load_config("tiny", ["model.teacher.random_init=false"]).model
    with pytest.raises(ValueError, match="model.teacher.pretrained is not set"):
        MuseTokenizer(cfg)
    with pytest.raises(ValueError, match="contradict"):
        load_config("tiny", ["model.teacher.pretrained=/somewhere"])

# SPEC §4, official configs: (lr, warm-up, end lr, grad_scale, backbone lr scale, loss weights).
OFFICIAL = {
    1: (4e-4, 2000, 1e-5, 0.5, 1.0, dict(reconstruction=1.0, perceptual=1.1, topology=2.0, itc=0.0, gan=0.0, lecam=0.0)),
    2: (2e-4, 5000, 1e-5, 0.5, 1.0, dict(reconstruction=1.0, perceptual=1.1, topology=5.0, itc=0.2, gan=0.0, lecam=0.0)),
    3: (5e-5, 1000, 1e-6, 1.0, 0.5, dict(reconstruction=1.0, perceptual=2.0, topology=0.2, itc=0.1, gan=0.5,
                                         lecam=0.001)),
}


def test_every_shipped_config_loads():
    names = shipped_configs()
    assert {"tiny", "muse_1b", "muse_1b/stage1", "muse_1b/paper/stage3"} <= set(names)
    for name in names:
        load_config(name)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_official_stages_match_the_spec(stage):
    cfg = load_config(f"muse_1b/stage{stage}")
    lr, warmup, end_lr, grad_scale, backbone_scale, weights = OFFICIAL[stage]
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.end_lr) == (lr, warmup, end_lr)
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.grad_clip == 1.0 and cfg.optim.weight_decay == 0.0
    assert cfg.model.grad_scale == grad_scale and cfg.optim.backbone_lr_scale == backbone_scale
    assert {k: getattr(cfg.loss, k) for k in weights} == weights
    assert cfg.train.stage == stage and cfg.train.steps == 50000 and cfg.data.batch_size == 32
    assert cfg.loss.reconstruction_kind == "l2" and cfg.loss.disc_start == 0
    assert cfg.train.init_weight == (None if stage == 1 else f"runs/muse_1b/stage{stage - 1}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_paper_variant_differs_only_where_table_9_does(stage):
    official, paper = load_config(f"muse_1b/stage{stage}"), load_config(f"muse_1b/paper/stage{stage}")
    assert paper.data.batch_size * 8 == 384 and paper.optim.weight_decay == 0.05
    assert paper.train.out_dir == f"runs/muse_1b_paper/stage{stage}"
    assert paper.train.init_weight == (None if stage == 1 else f"runs/muse_1b_paper/stage{stage - 1}")
    expected = dataclasses.replace(
        official, data=dataclasses.replace(official.data, batch_size=48),
        optim=dataclasses.replace(official.optim, weight_decay=0.05),
        train=dataclasses.replace(official.train, out_dir=paper.train.out_dir, init_weight=paper.train.init_weight))
    assert paper == expected


@pytest.mark.parametrize("override,message", [
    ("model.backend=flash", "model.backend must be auto, triton, torch or cuda"),
    ("model.supervise=first", "model.supervise must be 'last' or 'all'"),
    ("model.num_heads=7", "must be divisible by model.num_heads"),
])
def test_model_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])
