"""SynergisticBlock: official names, gradient routing (the method's core claim), fused = materialized."""

import pytest
import torch

from helpers import make_teacher
from muse.models import SynergisticBlock

OFFICIAL = ["q_topo", "k_topo", "v_sem", "v_itc", "q_norm", "k_norm", "proj", "norm1", "norm2", "mlp.w1",
            "mlp.w2", "mlp.w3"]
TOPOLOGY = ("q_topo", "k_topo", "q_norm", "k_norm")


def _block(device, backend="triton"):
    torch.manual_seed(0)
    return SynergisticBlock(64, num_heads=4, backend=backend).to(device)


def _grads(block):
    return {n.removesuffix(".weight"): (torch.zeros_like(p) if p.grad is None else p.grad)
            for n, p in block.named_parameters()}


def test_official_state_dict_names_and_mlp_width():
    block = SynergisticBlock(512, num_heads=8)
    assert sorted(block.state_dict()) == sorted(f"{n}.weight" for n in OFFICIAL)
    assert block.mlp.w1.out_features == int(2 * 4 * 512 / 3) == 1365


def test_output_loss_reaches_no_topology_parameter(device):
    block = _block(device)
    out = block(torch.randn(2, 16, 64, device=device), teacher=make_teacher(2, 16, device=device))
    out.x.pow(2).mean().backward()
    grads = _grads(block)
    for name in TOPOLOGY:
        assert torch.count_nonzero(grads[name]) == 0, name
    for name in ("v_sem", "proj", "mlp.w1", "norm1", "norm2"):
        assert torch.count_nonzero(grads[name]) > 0, name


def test_topology_loss_reaches_only_topology_parameters(device):
    block = _block(device)
    out = block(torch.randn(2, 16, 64, device=device), teacher=make_teacher(2, 16, device=device))
    out.loss_topo.backward()
    grads = _grads(block)
    for name in ("v_sem", "proj", "mlp.w1", "mlp.w2", "mlp.w3", "norm2", "v_itc"):
        assert torch.count_nonzero(grads[name]) == 0, name
    for name in (*TOPOLOGY, "norm1"):
        assert torch.count_nonzero(grads[name]) > 0, name


def test_itc_export_reaches_only_v_itc(device):
    block = _block(device)
    out = block(torch.randn(2, 16, 64, device=device))
    out.v_itc.mean(1).pow(2).sum().backward()
    grads = _grads(block)
    assert torch.count_nonzero(grads["v_itc"]) > 0
    for name in OFFICIAL:
        if name != "v_itc":
            assert torch.count_nonzero(grads[name]) == 0, name


@pytest.mark.parametrize("reduction", ("head_mean", "per_head"))
def test_fused_topology_loss_equals_materialized_maps(reduction, device):
    block = _block(device)
    x, teacher = torch.randn(2, 20, 64, device=device), make_teacher(2, 20, device=device)
    fused = block(x, teacher=teacher, kl_reduction=reduction)
    (fused.x.sum() + fused.loss_topo).backward()
    fused_grads = {n: g.clone() for n, g in _grads(block).items()}
    block.zero_grad()

    mode = "head_mean" if reduction == "head_mean" else "per_head"
    maps = block(x, return_attn=mode)
    t = teacher if reduction == "head_mean" else teacher[:, None]
    log_maps = torch.log(maps.attn + 1e-8) if reduction == "head_mean" else torch.log(maps.attn)
    loss = (torch.xlogy(t, t) - t * log_maps).sum(-1).mean()
    (maps.x.sum() + loss).backward()
    torch.testing.assert_close(fused.loss_topo, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.x, maps.x)
    for name, grad in _grads(block).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
