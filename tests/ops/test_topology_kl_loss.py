"""Fused topology KL loss: parity with the materialized fp64 reference, the fused attention + loss
op, no B·H·N² allocation, teacher checks, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_flash_rule, make_qkv, make_teacher
from muse_kernels import SynergisticAttention, synergistic_attention, topology_kl_loss
from muse_kernels.reference import topology_kl_loss_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (reduction, teacher shared by the heads?)
KL_CASES = (("head_mean", True), ("per_head", True), ("per_head", False))
KL_IDS = ("head_mean", "per_head-shared", "per_head-per_head_teacher")


def _teacher_dtype(dtype):
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def check_loss_parity(shape, dtype, device, reduction, shared, layout="contiguous", backend="triton"):
    """``backend``: a backend name of the public API, or a loss function (q, k, teacher, reduction)."""
    bsz, heads, seq, _ = shape
    q, k, _ = make_qkv(shape, dtype, device, layout)
    teacher = make_teacher(bsz, seq, None if shared else heads, _teacher_dtype(dtype), device)

    qo, ko = (x.detach().requires_grad_() for x in (q, k))
    if callable(backend):
        loss = backend(qo, ko, teacher, reduction)
    else:
        loss = topology_kl_loss(qo, ko, teacher, reduction=reduction, backend=backend)
    ours = (loss, *_grads(loss, (qo, ko)))

    qe, ke = (x.detach().requires_grad_() for x in (q, k))
    loss_e = topology_kl_loss_reference(qe, ke, teacher, reduction=reduction)
    eager = (loss_e, *_grads(loss_e, (qe, ke)))

    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    loss64 = topology_kl_loss_reference(q64, k64, teacher.double(), reduction=reduction)
    ref = (loss64, *_grads(loss64, (q64, k64)))

    assert loss.dtype == torch.float32 and loss.dim() == 0
    for name, o, e, r in zip(("loss", "dq", "dk"), ours, eager, ref):
        assert_flash_rule(name, o, e, r, dtype)


@pytest.mark.parametrize("seq", (1, 5, 64, 100, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_loss_parity_grid(seq, dtype, reduction, shared, device):
    check_loss_parity((2, 3, seq, 64), dtype, device, reduction, shared)


@pytest.mark.parametrize("heads", (1, 8))
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_loss_parity_head_counts(heads, reduction, shared, device):
    check_loss_parity((2, heads, 100, 32), torch.bfloat16, device, reduction, shared, layout="bnhd")


@pytest.mark.parametrize("dim", (16, 128))
def test_loss_parity_head_dims(dim, device):
    check_loss_parity((1, 2, 70, dim), torch.float16, device, "per_head", True, layout="sliced")
    check_loss_parity((1, 2, 70, dim), torch.float32, device, "head_mean", True, layout="sliced")


def check_fused_attention_and_loss(shape, dtype, device, reduction, shared, backend="triton"):
    """synergistic_attention(..., teacher=) = shielded attention output + the KL, with dV from dO and
    dQ/dK from the KL only."""
    bsz, heads, seq, _ = shape
    q, k, v = make_qkv(shape, dtype, device, "bnhd")
    teacher = make_teacher(bsz, seq, None if shared else heads, _teacher_dtype(dtype), device)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    def run(q, k, v, teacher, grad_out, backend):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        # The fp64 copy of a bf16 teacher keeps bf16's row-sum error; the oracle need not check it.
        out, loss = synergistic_attention(q, k, v, teacher=teacher, kl_reduction=reduction, backend=backend,
                                          validate_teacher=teacher.dtype != torch.float64)
        total = (out * grad_out.to(out.dtype)).sum() + loss
        return (out, loss, *_grads(total, (q, k, v)))

    grad_out = grad_out.to(device)
    ours = run(q, k, v, teacher, grad_out, backend)
    eager = run(q, k, v, teacher, grad_out, "torch")
    ref = run(*(x.double() for x in (q, k, v, teacher, grad_out)), "torch")
    for name, o, e, r in zip(("out", "loss", "dq", "dk", "dv"), ours, eager, ref):
        assert_flash_rule(name, o, e, r, dtype)
    # The output's gradient never reaches q, k: they match the loss-only gradients.
    qo, ko = (x.detach().requires_grad_() for x in (q, k))
    alone = _grads(topology_kl_loss(qo, ko, teacher, reduction=reduction, backend=backend), (qo, ko))
    assert torch.equal(ours[2], alone[0]) and torch.equal(ours[3], alone[1])


@pytest.mark.parametrize("seq", (1, 17, 100))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_fused_attention_and_loss(seq, dtype, reduction, shared, device):
    check_fused_attention_and_loss((2, 3, seq, 32), dtype, device, reduction, shared)


class _AllocationTracker(TorchDispatchMode):
    """Records the element count of every tensor an op produces (kernel launches allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
@pytest.mark.parametrize("with_v", (False, True), ids=("loss", "attention+loss"))
def test_no_tensor_of_per_head_map_size_is_allocated(reduction, shared, with_v, device):
    bsz, heads, seq, dim = 2, 4, 40, 16
    per_head_maps = bsz * heads * seq * seq

    def forward_backward(backend):
        q, k, v = (x.requires_grad_() for x in make_qkv((bsz, heads, seq, dim), torch.float32, device))
        teacher = make_teacher(bsz, seq, None if shared else heads, device=device)
        with _AllocationTracker() as tracker:
            if with_v:
                out, loss = synergistic_attention(q, k, v, teacher=teacher, kl_reduction=reduction,
                                                  backend=backend)
                (out.sum() + loss).backward()
            else:
                topology_kl_loss(q, k, teacher, reduction=reduction, backend=backend).backward()
        return tracker.largest, teacher.numel()

    largest, teacher_size = forward_backward("triton")
    assert largest < per_head_maps or largest == teacher_size == per_head_maps, largest
    if shared:
        assert largest < per_head_maps
    # The tracker does see maps: the eager reference allocates them.
    assert forward_backward("torch")[0] >= per_head_maps


def test_zero_teacher_entries_give_finite_loss_and_gradients(device):
    q, k, _ = (x.requires_grad_() for x in make_qkv((1, 2, 9, 16), torch.float32, device))
    teacher = torch.zeros(1, 9, 9, device=device)
    teacher[..., 0] = 1.0  # one-hot rows: every other entry is an exact zero
    for reduction in ("head_mean", "per_head"):
        loss = topology_kl_loss(q, k, teacher, reduction=reduction, backend="triton")
        grads = torch.autograd.grad(loss, (q, k))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        expected = topology_kl_loss_reference(q.detach().double().cpu(), k.detach().double().cpu(),
                                              teacher.double().cpu(), reduction=reduction)
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- module

def test_module_teacher_forward_matches_eager(device):
    torch.manual_seed(0)
    fused = SynergisticAttention(64, num_heads=4, backend="triton").to(device)
    eager = SynergisticAttention(64, num_heads=4, backend="torch")
    eager.load_state_dict(fused.state_dict())
    x, teacher = torch.randn(2, 30, 64), make_teacher(2, 30)
    results = []
    for module, dev in ((fused, device), (eager, "cpu")):
        out, loss = module(x.to(dev), teacher=teacher.to(dev))
        (out.pow(2).sum() + loss).backward()
        results.append((out.detach().cpu(), loss.detach().cpu(),
                        {n: p.grad.cpu() for n, p in module.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    for name in results[1][2]:
        torch.testing.assert_close(results[0][2][name], results[1][2][name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("reduction", ("head_mean", "per_head"))
def test_module_with_teacher_compiles_fullgraph(reduction, device):
    torch.manual_seed(0)
    module = SynergisticAttention(32, num_heads=2, backend="triton").to(device)
    x, teacher = torch.randn(2, 12, 32, device=device), make_teacher(2, 12, device=device)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out_c, loss_c = compiled(x, teacher=teacher, kl_reduction=reduction)
    out_e, loss_e = module(x, teacher=teacher, kl_reduction=reduction)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    assert module.q_topo.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- errors

def _qk(shape=(2, 2, 6, 16)):
    return [torch.randn(shape) for _ in range(2)]


@pytest.mark.parametrize("make_teacher_arg,kwargs,exc,match", [
    (lambda: make_teacher(2, 7), {}, ValueError, r"teacher must have shape \(2, 6, 6\)"),
    (lambda: make_teacher(2, 6, heads=2), {"reduction": "head_mean"}, ValueError, "head_mean compares"),
    (lambda: make_teacher(2, 6, heads=3), {"reduction": "per_head"}, ValueError, "teacher must have shape"),
    (lambda: make_teacher(2, 6).half(), {}, TypeError, "teacher must be float32 or bfloat16"),
    (lambda: make_teacher(2, 6).tolist(), {}, TypeError, "teacher must be a torch.Tensor"),
    (lambda: make_teacher(2, 6) * 1.5, {}, ValueError, "rows must sum to 1"),
    (lambda: make_teacher(2, 6) - 0.01, {}, ValueError, "negative entries"),
    (lambda: make_teacher(2, 6).index_fill(2, torch.tensor([0]), float("nan")), {}, ValueError, "non-finite"),
    (lambda: make_teacher(2, 6), {"reduction": "mean"}, ValueError, "reduction must be one of"),
    (lambda: make_teacher(2, 6), {"eps": -1.0}, ValueError, "eps must be"),
])
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_bad_teacher_raises_clear_error(make_teacher_arg, kwargs, exc, match, backend):
    q, k = _qk()
    with pytest.raises(exc, match=match):
        topology_kl_loss(q, k, make_teacher_arg(), backend=backend, **kwargs)


def test_validate_false_skips_the_value_checks():
    q, k = _qk()
    loss = topology_kl_loss(q, k, make_teacher(2, 6) * 1.5, validate=False, backend="triton")
    assert torch.isfinite(loss)


def test_fused_attention_teacher_argument_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match="return_attn must be None when a teacher is given"):
        synergistic_attention(q, k, k, teacher=make_teacher(2, 6), return_attn="per_head")
    with pytest.raises(ValueError, match="shield must be True when a teacher is given"):
        synergistic_attention(q, k, k, teacher=make_teacher(2, 6), shield=False)


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("seq", (64, 256, 1024))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
def test_loss_parity_muse_shapes_gpu(seq, dtype, reduction, shared):
    check_loss_parity((32, 8, seq, 64), dtype, torch.device("cuda"), reduction, shared, layout="bnhd")


@pytest.mark.parametrize("reduction,shared", KL_CASES, ids=KL_IDS)
@pytest.mark.parametrize("with_v", (False, True), ids=("loss", "attention+loss"))
def test_eager_path_and_custom_ops_agree_exactly(reduction, shared, with_v, device):
    """Eager calls skip the custom-op dispatcher; under a dispatch mode the ops run. Same launchers,
    so the loss, the output and every gradient are bitwise equal."""
    bsz, heads, seq, dim = 2, 3, 23, 16
    q0, k0, v0 = make_qkv((bsz, heads, seq, dim), torch.float32, device)
    teacher = make_teacher(bsz, seq, None if shared else heads, device=device)

    def run():
        q, k, v = (x.detach().requires_grad_() for x in (q0, k0, v0))
        if with_v:
            out, loss = synergistic_attention(q, k, v, teacher=teacher, kl_reduction=reduction, backend="triton")
            (out.square().sum() + 3.0 * loss).backward()
            return [out, loss, q.grad, k.grad, v.grad]
        loss = topology_kl_loss(q, k, teacher, reduction=reduction, backend="triton")
        (3.0 * loss).backward()
        return [loss, q.grad, k.grad]

    eager = run()
    with _AllocationTracker():
        via_ops = run()
    for a, b in zip(eager, via_ops):
        assert torch.equal(a, b)
