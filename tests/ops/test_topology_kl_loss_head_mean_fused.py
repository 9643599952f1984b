"""The official (head-mean) topology loss with s̄ kept in registers (single pass for fp16/bf16 and
N ≤ 256, the maps kernel's loss tail elsewhere): parity with the fp64 reference (FlashAttention
rule) for the loss and every gradient on the key tiles' boundaries, with and without the attention
output; agreement with the composed path; which kernels run; the upstream gradient applied on the
device."""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv, make_teacher
from muse_kernels import synergistic_attention, topology_kl_loss
from muse_kernels.ops import synergistic_attention as op
from muse_kernels.ops import topology_kl_loss as kl_op
from test_topology_kl_loss import _grads, check_fused_attention_and_loss, check_loss_parity

DTYPES = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("seq", (1, 2, 31, 64, 65, 129, 256))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_head_mean_loss_parity(seq, dtype, device):
    assert op.single_pass_key_tile(seq, 64, dtype) is not None
    check_loss_parity((2, 3, seq, 64), dtype, device, "head_mean", True)


@pytest.mark.parametrize("seq,dim", ((63, 16), (128, 32), (200, 32)))
def test_fused_head_mean_loss_parity_strided_head_dims(seq, dim, device):
    check_loss_parity((1, 4, seq, dim), torch.bfloat16, device, "head_mean", True, layout="bnhd")
    check_loss_parity((1, 2, seq, dim), torch.float16, device, "head_mean", True, layout="sliced")


@pytest.mark.parametrize("seq", (1, 37, 130))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_head_mean_attention_and_loss(seq, dtype, device):
    check_fused_attention_and_loss((2, 3, seq, 64), dtype, device, "head_mean", True)


@pytest.mark.parametrize("shape,dtype", (((2, 3, 300, 64), torch.bfloat16), ((2, 3, 130, 64), torch.float32),
                                         ((1, 2, 100, 16), torch.float16)), ids=str)
def test_maps_kernel_loss_tail_parity(shape, dtype, device):
    """Beyond the single pass (N > 256, fp32, small head dims): the maps kernel's loss tail."""
    assert op.single_pass_key_tile(shape[2], shape[3], dtype) not in op.SINGLE_PASS_LOSS_KEY_TILES.get(shape[3], ())
    check_loss_parity(shape, dtype, device, "head_mean", True, layout="bnhd")


def test_maps_kernel_loss_tail_with_the_attention_output(device):
    check_fused_attention_and_loss((1, 2, 70, 128), torch.float16, device, "head_mean", True)


def _loss_and_grads(q, k, teacher, v=None, grad_out=None, weight=1.0):
    q, k = (x.detach().requires_grad_() for x in (q, k))
    if v is None:
        total = weight * topology_kl_loss(q, k, teacher, reduction="head_mean", backend="triton")
        loss = total
    else:
        v = v.detach().requires_grad_()
        out, loss = synergistic_attention(q, k, v, teacher=teacher, kl_reduction="head_mean", backend="triton")
        total = (out * grad_out).sum() + weight * loss
    return (loss, *_grads(total, (q, k) if v is None else (q, k, v)))


@pytest.mark.parametrize("seq,dtype", ((100, torch.bfloat16), (300, torch.bfloat16), (100, torch.float32)),
                         ids=("single_pass", "maps_kernel", "maps_kernel-fp32"))
def test_agrees_with_the_composed_path(seq, dtype, device):
    """Same fp32 arithmetic as the mean-map path (maps kernel, elementwise loss and map gradient,
    scaled on the host): loss, saved map gradient and gradients agree to fp32 rounding."""
    q, k, v = make_qkv((2, 4, seq, 64), dtype, device, "bnhd")
    teacher = make_teacher(2, seq, dtype=torch.bfloat16, device=device)
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(device, v.dtype)
    grad_loss = torch.tensor(0.7, device=device)
    results = []
    for fused in (True, False):
        out, loss, lse, map_grad = kl_op.topology_kl_forward(
            op.synergistic_attention_forward, q, k, v, teacher, 0.125, "head_mean", 1e-8,
            op.head_mean_kl_forward if fused else None)
        grads = kl_op.topology_kl_backward(
            op.synergistic_attention_backward, grad_out, grad_loss, q, k, v, out, lse, teacher, map_grad,
            0.125, "head_mean", 1e-8, scales_map_grad=fused)
        results.append((out, loss, lse, map_grad, *grads))
    for name, a, b in zip(("out", "loss", "lse", "map_grad", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-5, atol=2e-3 if name == "out" else 1e-6, msg=name)


def test_upstream_gradient_is_applied_on_the_device(device):
    """The map gradient is saved unscaled; the backward kernels multiply by the loss's upstream gradient
    (and 1/(B·N)) that they read from memory."""
    q, k, _ = make_qkv((2, 2, 50, 32), torch.float16, device)
    teacher = make_teacher(2, 50, device=device)
    _, dq1, dk1 = _loss_and_grads(q, k, teacher)
    _, dq3, dk3 = _loss_and_grads(q, k, teacher, weight=-3.5)
    # fp16 gradients: each side rounds once, so compare against the gradients' own scale.
    for scaled, unit in ((dq3, dq1), (dk3, dk1)):
        torch.testing.assert_close(scaled.float(), -3.5 * unit.float(), rtol=0, atol=4e-3 * unit.abs().max().item())


class _Recorder:
    """Wraps a kernel: records its constexprs, then runs it."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("seq,dim,dtype,expected", [
    (256, 64, torch.bfloat16, ["single_pass+loss"]),
    (5, 16, torch.float16, ["single_pass+loss"]),
    # Elsewhere the flash forward's LSE, then the maps kernel's head-mean programs with the loss tail.
    (100, 16, torch.float16, ["fwd", "maps+loss"]),
    (257, 64, torch.bfloat16, ["fwd", "maps+loss"]),
    (64, 128, torch.bfloat16, ["fwd", "maps+loss"]),
    (64, 64, torch.float32, ["fwd", "maps+loss"]),
])
def test_dispatch(seq, dim, dtype, expected, monkeypatch, device):
    launches = []
    for name in ("single_pass", "fwd", "maps", "bwd_dq", "bwd_dkdv"):
        attr = f"_synergistic_attention_{name}_kernel"
        monkeypatch.setattr(op, attr, _Recorder(getattr(op, attr), name, launches))
    q, k, _ = (x.requires_grad_() for x in make_qkv((1, 2, seq, dim), dtype, device))
    topology_kl_loss(q, k, make_teacher(1, seq, device=device), reduction="head_mean", backend="triton").backward()
    named = [name + ("+loss" if name != "fwd" and kwargs.get("TEACHER") else "") for name, kwargs in launches]
    assert named == [*expected, "bwd_dq", "bwd_dkdv"]
    assert all(kwargs["HEAD_MEAN"] for name, kwargs in launches if name in ("single_pass", "maps"))
    assert not launches[0][1]["HAS_V"]


@pytest.mark.parametrize("seq,dtype", ((70, torch.bfloat16), (257, torch.bfloat16), (70, torch.float32)))
def test_fused_map_gradient_matches_its_formula(seq, dtype, device):
    """The saved tensor is −t / (s̄ + eps) and the loss the mean of the row terms, on both kernels."""
    q, k, _ = make_qkv((2, 3, seq, 32), dtype, device)
    teacher = make_teacher(2, seq, device=device)
    eps = 1e-3
    out, loss, lse, map_grad = op.head_mean_kl_forward(q, k, None, teacher, 0.3, eps)
    assert out is None and map_grad.shape == (2, seq, seq) and map_grad.dtype == torch.float32
    mean = torch.softmax(0.3 * q.double() @ k.double().transpose(-1, -2), -1).mean(1)
    t = teacher.double()
    torch.testing.assert_close(map_grad.double(), -t / (mean + eps), rtol=1e-2, atol=1e-4)
    expected = (torch.xlogy(t, t) - t * torch.log(mean + eps)).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-4)


def test_map_gradient_scale_needs_its_factor():
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match="dattn_kl_scale"):
        op.synergistic_attention_backward(None, torch.zeros(1, 4, 4), q, q, None, None, torch.zeros(1, 1, 4), 0.25,
                                          dattn_kl_scale=0.5)
