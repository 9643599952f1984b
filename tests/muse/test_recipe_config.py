"""The shipped configs pin the official recipe of SPEC §7 ("Recipe"), stage by stage; the tiny configs
use the same recipe at tiny sizes."""

import pytest

from muse.config import load_config

# SPEC §7 "Recipe" (and §4's loss weights), the official configs' values.
RECIPE = {
    "loss": dict(reconstruction_kind="l2", lpips_weight=1.0, convnext_weight=0.1, convnext_resolution=224,
                 disc_channels=128, disc_stages=3, disc_blur=True, disc_blur_kernel_size=4, disc_pool_size=16,
                 lecam_decay=0.999, disc_factor=1.0, disc_start=0),
    "optim": dict(betas=[0.9, 0.999], weight_decay=1e-4, grad_clip=1.0, disc_weight_decay=None,
                  disc_grad_clip=None, disc_warmup_steps=None, disc_end_lr=None,
                  no_decay_keywords=["ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma"]),
    "train": dict(ema_decay=0.999, ema_warmup=True, steps=50000),
}
STAGES = {
    1: dict(loss=dict(reconstruction=1.0, perceptual=1.1, topology=2.0, itc=0.0, gan=0.0, lecam=0.0),
            optim=dict(lr=4e-4, end_lr=1e-5, warmup_steps=2000, disc_lr=4e-4, backbone_lr_scale=1.0)),
    2: dict(loss=dict(reconstruction=1.0, perceptual=1.1, topology=5.0, itc=0.2, gan=0.0, lecam=0.0),
            optim=dict(lr=2e-4, end_lr=1e-5, warmup_steps=5000, disc_lr=2e-4, backbone_lr_scale=1.0)),
    3: dict(loss=dict(reconstruction=1.0, perceptual=2.0, topology=0.2, itc=0.1, gan=0.5, lecam=0.001),
            optim=dict(lr=5e-5, end_lr=1e-6, warmup_steps=1000, disc_lr=1e-4, backbone_lr_scale=0.5)),
}


@pytest.fixture(autouse=True)
def _checkpoint_paths(monkeypatch):
    # The muse_1b configs name local files through environment variables; any value loads.
    for name in ("MUSE_INTERNVIT_PATH", "MUSE_DINOV3_PATH", "MUSE_DCAE_PATH", "MUSE_CLIP_TEXT_PATH",
                 "MUSE_VGG16_WEIGHTS", "MUSE_CONVNEXT_WEIGHTS", "MUSE_SHARDS"):
        monkeypatch.setenv(name, f"/checkpoints/{name.lower()}")


def _section_values(cfg, section, expected):
    return {key: getattr(getattr(cfg, section), key) for key in expected}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_official_configs_pin_the_recipe(stage):
    cfg = load_config(f"muse_1b/stage{stage}")
    for section, expected in RECIPE.items():
        assert _section_values(cfg, section, expected) == expected, section
    for section, expected in STAGES[stage].items():
        assert _section_values(cfg, section, expected) == expected, section
    # The perceptual backbones' torchvision weights are local files named by the environment.
    assert cfg.loss.vgg16_weights == "/checkpoints/muse_vgg16_weights"
    assert cfg.loss.convnext_weights == "/checkpoints/muse_convnext_weights"
    assert cfg.loss.lpips_heads is None  # torchmetrics' copy of the published heads
    assert cfg.loss.disc_init is None


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_tiny_configs_use_the_same_recipe_at_tiny_sizes(stage):
    cfg = load_config(f"tiny/stage{stage}")
    # What tiny changes: ConvNeXt-S reads the 32-pixel images at their size, schedules are short.
    sizes = {"loss": {"convnext_resolution": 32}, "train": {"steps": 30}}
    for section, expected in RECIPE.items():
        expected = expected | sizes.get(section, {})
        assert _section_values(cfg, section, expected) == expected, section
    assert _section_values(cfg, "loss", STAGES[stage]["loss"]) == STAGES[stage]["loss"]
    assert cfg.optim.backbone_lr_scale == STAGES[stage]["optim"]["backbone_lr_scale"]


# The official configs' experiment cadence: save_every (→ ckpt_every), generate_every (→ image_every),
# log_every, and training.seed.
CADENCE = {
    ("muse_1b", 1): (5000, 2000), ("muse_1b", 2): (5000, 2000), ("muse_1b", 3): (5000, 2500),
    ("muse_3b", 1): (7500, 2500), ("muse_3b", 2): (7500, 2500), ("muse_3b", 3): (7500, 2500),
}


@pytest.mark.parametrize("model,stage", sorted(CADENCE))
def test_official_configs_keep_the_official_cadence_and_seed(model, stage, monkeypatch):
    monkeypatch.setenv("MUSE_INTERNVL3_2B_PATH", "/checkpoints/internvl3_2b")
    cfg = load_config(f"{model}/stage{stage}")
    ckpt_every, image_every = CADENCE[model, stage]
    assert (cfg.train.ckpt_every, cfg.train.image_every, cfg.train.log_every, cfg.train.seed) == \
        (ckpt_every, image_every, 50, 42)
