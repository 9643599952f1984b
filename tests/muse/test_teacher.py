"""The DINOv3 teacher's maps through our attention kernels (``teacher.attention: muse``: only the last
layer writes its head-mean map) equal the eager ``output_attentions`` path under the FlashAttention
rule, against an fp64 reference, for the tiny teacher and a ViT-H+/16-shaped layer."""

import copy

import pytest
import torch
from helpers import assert_flash_rule

from muse.config import load_config
from muse.models import MuseTokenizer

VIT_H_PLUS_LAYER = ["model.teacher.hidden_size=1280", "model.teacher.num_heads=20", "model.teacher.num_layers=1",
                    "model.teacher.intermediate_size=5120", "model.teacher.patch_size=16",
                    "model.teacher.num_register_tokens=4", "model.image_size=64"]


def _with_attention(model, attention: str, dtype=torch.float32):
    clone = copy.deepcopy(model).to(dtype)
    clone.cfg = copy.deepcopy(model.cfg)
    clone.cfg.teacher.attention = attention
    return clone


@pytest.mark.parametrize("overrides,size", [([], 32), (VIT_H_PLUS_LAYER, 64)], ids=["tiny", "vit-h+-layer"])
def test_muse_teacher_equals_eager_under_the_flash_rule(overrides, size):
    torch.manual_seed(0)
    model = MuseTokenizer(load_config("tiny", overrides).model).eval()
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours, eager = _with_attention(model, "muse"), _with_attention(model, "eager")
    reference = _with_attention(model, "eager", torch.float64)
    side = size // model.cfg.teacher.patch_size
    # The teacher's own grid (no Ψ: every patch row as the teacher wrote it) and a resized one.
    for grid in ((side, side), (side // 2, side // 2)):
        assert_flash_rule(f"teacher maps at {grid}", ours.teacher_maps(images, grid), eager.teacher_maps(images, grid),
                          reference.teacher_maps(images.double(), grid), torch.float32)
