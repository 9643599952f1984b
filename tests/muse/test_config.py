"""Shipped configs: every one loads, the official stages carry SPEC §4's values, the paper variants
differ from them exactly where Table 9 does."""

import dataclasses
import os
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
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.grad_clip == 1.0 and cfg.optim.weight_decay == 1e-4
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


# ------------------------------------------------------------------ loader messages (issue 16, list 6)

def test_muse_1b_data_defaults_are_the_official_sources_and_ratios():
    cfg = load_config("muse_1b/stage1")
    # BLIP3o short captions, BLIP3o long captions, JourneyDB (official configs), paths from the environment.
    assert cfg.data.shards == [os.environ[v] for v in ("MUSE_SHARDS_BLIP3O_SHORT", "MUSE_SHARDS_BLIP3O_LONG",
                                                       "MUSE_SHARDS_JOURNEYDB")]
    assert cfg.data.ratios == [0.2, 0.6, 0.2]
    assert (cfg.data.shuffle_buffer, cfg.data.shuffle_initial) == (5000, 1000)
    assert load_config("muse_1b/stage3").data == cfg.data


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 3\n  out_dir: [unclosed\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": invalid YAML at line \d+"):
        load_config(str(path))


def test_a_relative_inherit_is_read_next_to_its_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("inherit: tiny\ntrain: {steps: 7}\n")
    (tmp_path / "configs" / "child.yaml").write_text("inherit: base.yaml\ntrain: {seed: 5}\n")
    monkeypatch.chdir(tmp_path)  # not the configs' folder
    cfg = load_config(str(tmp_path / "configs" / "child.yaml"))
    assert (cfg.train.steps, cfg.train.seed, cfg.model.dim) == (7, 5, 64)


def test_an_empty_yaml_is_an_error_not_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
    with pytest.raises(ValueError, match=r"empty\.yaml is empty"):
        load_config(str(tmp_path / "empty.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml must hold a mapping of sections"):
        load_config(str(tmp_path / "list.yaml"))


def test_overrides_must_be_a_list_and_well_formed():
    # A bare string used to be read character by character ("override 't' must look like key.sub=value").
    with pytest.raises(TypeError, match=r"overrides must be a list of 'key.sub=value' strings, got the string "
                                        r"'train.steps=3'"):
        load_config("tiny", "train.steps=3")
    with pytest.raises(ValueError, match=r"override 'data.shards=\[a, b' : '\[a, b' is not valid YAML"):
        load_config("tiny", ["data.shards=[a, b"])
    with pytest.raises(ValueError, match=r"override '=3' has no key"):
        load_config("tiny", ["=3"])


@pytest.mark.parametrize("override,message", [
    ("model.dim=-4", "model.dim must be > 0, got -4"),
    ("model.num_heads=0", "model.num_heads must be > 0, got 0"),
    ("model.num_blocks=0", "model.num_blocks must be > 0, got 0"),
    ("model.encoder.num_heads=0", "model.encoder.num_heads must be > 0, got 0"),
    ("model.encoder.patch_size=0", "model.encoder.patch_size must be > 0, got 0"),
    ("model.teacher.hidden_size=-1", "model.teacher.hidden_size must be > 0, got -1"),
    ("model.decoder.attention_head_dim=0", "model.decoder.attention_head_dim must be > 0, got 0"),
    ("model.decoder.block_out_channels=[8,0,16,32]", r"model.decoder.block_out_channels must be > 0 \(each entry\)"),
    ("model.text.embed_dim=0", "model.text.embed_dim must be > 0, got 0"),
    ("data.batch_size=0", "data.batch_size must be > 0, got 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("data.ratios=[0]", "data.ratios must all be > 0"),
    ("optim.lr=-1", "optim.lr must be > 0, got -1"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0, got -5"),
    ("optim.grad_clip=0", "optim.grad_clip must be > 0, got 0"),
    ("loss.topology=-2", "loss.topology must be >= 0, got -2"),
    ("train.steps=0", "train.steps must be > 0, got 0"),
    ("train.ckpt_every=0", "train.ckpt_every must be > 0, got 0"),
    ("train.log_every=0", "train.log_every must be > 0, got 0"),
])
def test_non_positive_counts_and_sizes_are_config_errors(override, message):
    # Each used to fail deep inside torch (or, like train.steps=0, not at all).
    overrides = [override, "data.shards=[a]"] if override.startswith("data.ratios") else [override]
    with pytest.raises(ValueError, match=message):
        load_config("tiny", overrides)
