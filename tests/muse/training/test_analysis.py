"""Gradient cosines and pictures."""

import numpy as np
import torch
from PIL import Image
from torch import nn

from muse.training.analysis import gradient_cosines, parameter_group, save_attention_grid, save_reconstruction_grid


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.muse_blocks = nn.ModuleList([nn.ModuleDict({"q_topo": nn.Linear(3, 3), "v_sem": nn.Linear(3, 3),
                                                         "proj": nn.Linear(3, 3)})])


def test_groups():
    assert parameter_group("muse_blocks.0.q_topo.weight") == "qk"
    assert parameter_group("muse_blocks.3.k_norm.weight") == "qk"
    assert parameter_group("muse_blocks.0.v_sem.weight") == "v"
    assert parameter_group("muse_blocks.0.mlp.w1.weight") == "rest"
    assert parameter_group("decoder.conv.weight") is None


def test_cosines_against_a_direct_computation():
    torch.manual_seed(0)
    model = TwoBlocks()
    block = model.muse_blocks[0]
    x = torch.randn(5, 3)
    a = (block["q_topo"](x) * block["v_sem"](x)).sum()
    b = block["q_topo"](x).pow(2).sum() + block["proj"](x).sum()
    cos = gradient_cosines(model, {"a": a, "b": b})
    ga = torch.autograd.grad(a, list(block["q_topo"].parameters()), retain_graph=True)
    gb = torch.autograd.grad(b, list(block["q_topo"].parameters()), retain_graph=True)
    fa, fb = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
    assert abs(cos["a|b/qk"] - float(fa @ fb / (fa.norm() * fb.norm()))) < 1e-6
    assert cos["a|b/v"] == 0.0 and cos["a|b/rest"] == 0.0  # b never reaches v, a never reaches proj


def test_pictures(tmp_path):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    save_reconstruction_grid(images, images, tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size == (48 * 8, 32 * 8)  # 16-pixel tiles enlarged to 128
    maps = torch.softmax(torch.randn(3, 16, 16), -1)
    # A matplotlib figure: one row per image (four labelled panels with colour bars).
    save_attention_grid(images, maps, maps, (4, 4), tmp_path / "a.png")
    save_attention_grid(images[:1], maps[:1], maps[:1], (4, 4), tmp_path / "a1.png", count=1)
    three, one = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "a1.png"))
    assert 2.5 * one.shape[0] < three.shape[0] < 3.5 * one.shape[0]
