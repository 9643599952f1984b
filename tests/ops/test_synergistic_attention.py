"""Synergistic attention: parity with an fp64 reference (FlashAttention rule), the gradient shield,
strided inputs, bad input, torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_flash_rule, make_qkv
from muse_kernels import synergistic_attention
from muse_kernels.reference import synergistic_attention_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEQ_LENS = (1, 2, 17, 64, 100, 257)
MODES = (None, "per_head", "head_mean")


def _run(q, k, v, *, backend, return_attn, shield, attn_dtype, grad_out, grad_attn):
    """Forward, then the gradients for the given upstream gradients (grad_attn None: maps unused).
    ``backend`` names a backend of the public API, or is an attention function with the same contract."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if callable(backend):
        out, attn = backend(q, k, v, q.shape[-1] ** -0.5, return_attn, attn_dtype, shield)
    else:
        out, attn = synergistic_attention(q, k, v, return_attn=return_attn, shield=shield,
                                          attn_dtype=attn_dtype, backend=backend)
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if grad_attn is not None:
        outputs.append(attn)
        grads.append(grad_attn.to(attn.dtype))
    # Shielded maps out of the loss leave q, k without a gradient (None) in every backend.
    dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads, allow_unused=True)
    return out, attn, dq, dk, dv


def check_parity(shape, dtype, device, *, return_attn, shield, maps_used=True, layout="contiguous",
                 attn_dtype=torch.float32, backend="triton", baseline="torch"):
    """``backend``'s outputs, maps and gradients against the fp64 reference, with the error of the
    ``baseline`` backend in the same dtype as the yardstick (FlashAttention rule)."""
    q, k, v = make_qkv(shape, dtype, device, layout)
    bsz, heads, seq, _ = shape
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad_attn = None
    if return_attn is not None and maps_used:
        map_shape = (bsz, heads, seq, seq) if return_attn == "per_head" else (bsz, seq, seq)
        grad_attn = torch.randn(map_shape, generator=gen, dtype=torch.float64)

    grad_out = grad_out.to(device)
    grad_attn = None if grad_attn is None else grad_attn.to(device)

    ours = _run(q, k, v, backend=backend, return_attn=return_attn, shield=shield, attn_dtype=attn_dtype,
                grad_out=grad_out, grad_attn=grad_attn)
    # The same-dtype baseline (on the same device) keeps its maps in the dtype ours writes them in.
    eager = _run(q, k, v, backend=baseline, return_attn=return_attn, shield=shield,
                 attn_dtype=attn_dtype, grad_out=grad_out, grad_attn=grad_attn)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64, attn64 = synergistic_attention_reference(q64, k64, v64, return_attn=return_attn, shield=shield,
                                                    attn_dtype=None)
    outputs, grads = [out64], [grad_out]
    if grad_attn is not None:
        outputs.append(attn64)
        grads.append(grad_attn)
    ref = (out64, attn64, *torch.autograd.grad(outputs, (q64, k64, v64), grads, materialize_grads=True))

    names = ("out", "attn", "dq", "dk", "dv")
    qk_pruned = shield and grad_attn is None
    for name, o, e, r in zip(names, ours, eager, ref):
        if name == "attn" and return_attn is None:
            assert o is None
            continue
        if name in ("dq", "dk") and qk_pruned:
            # Nothing reaches q, k: no gradient at all, in ours as in the baseline (not zeros).
            assert o is None and e is None, f"{name}: expected no gradient, got {type(o)} / {type(e)}"
            continue
        assert o is not None and e is not None, f"{name}: missing gradient"
        assert o.dtype == e.dtype, f"{name}: dtype {o.dtype} != eager {e.dtype}"
        assert_flash_rule(name, o, e, r, dtype)
    return ours


# Every N with every dtype, shield setting and map kind (maps in the loss), D = 64, B·H = 2·3.
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shield", (True, False), ids=("shield", "noshield"))
@pytest.mark.parametrize("return_attn", MODES, ids=str)
def test_parity_grid(seq, dtype, shield, return_attn, device):
    check_parity((2, 3, seq, 64), dtype, device, return_attn=return_attn, shield=shield)


# Every supported head dim, with awkward N, strided layouts and both map dtypes.
@pytest.mark.parametrize("dim", (16, 32, 64, 128))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq,layout,return_attn,shield,attn_dtype", [
    (17, "bnhd", "per_head", False, torch.float32),
    (100, "sliced", "head_mean", True, torch.bfloat16),
    (67, "bnhd", "head_mean", False, torch.bfloat16),
])
def test_parity_head_dims_and_layouts(dim, dtype, seq, layout, return_attn, shield, attn_dtype, device):
    check_parity((2, 2, seq, dim), dtype, device, return_attn=return_attn, shield=shield, layout=layout,
                 attn_dtype=attn_dtype)


@pytest.mark.parametrize("return_attn", MODES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "bnhd", "sliced"))
def test_shield_maps_unused_gives_q_k_no_gradient(return_attn, layout, device):
    # check_parity asserts dq, dk are None like the reference's, and dv against the reference.
    _, _, dq, dk, dv = check_parity((2, 2, 45, 32), torch.bfloat16, device, return_attn=return_attn,
                                    shield=True, maps_used=False, layout=layout)
    assert dq is None and dk is None and torch.count_nonzero(dv) > 0


def test_shield_prunes_the_layers_that_produced_q_and_k(device):
    """With the maps out of the loss, autograd never runs the backward of what made q and k."""
    q, k, v = (x.requires_grad_() for x in make_qkv((1, 2, 9, 16), torch.float32, device))
    ran = []

    def record(grad):  # autograd calls tensor hooks with None for an input that got no gradient
        if grad is not None:
            ran.append(grad)

    q_in = q * 1.0
    q_in.register_hook(record)
    out, _ = synergistic_attention(q_in, k, v, backend="triton", return_attn="per_head")
    out.sum().backward()
    assert ran == [] and q.grad is None and k.grad is None and v.grad is not None


@pytest.mark.parametrize("return_attn", MODES, ids=str)
def test_no_shield_matches_plain_autograd_attention(return_attn, device):
    """shield=False is ordinary attention: compare with plain autograd softmax attention in fp64."""
    shape = (1, 2, 33, 16)
    q, k, v = make_qkv(shape, torch.float32, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, attn = synergistic_attention(q, k, v, return_attn=return_attn, shield=False, backend="triton")
    loss = (out.double().cpu() ** 2).sum()
    if attn is not None:
        loss = loss + (attn.double().cpu() * torch.linspace(0, 1, attn.shape[-1], dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))

    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    probs = torch.softmax(q64 @ k64.transpose(-1, -2) / 4.0, dim=-1)
    loss64 = ((probs @ v64) ** 2).sum()
    if return_attn is not None:
        maps = probs if return_attn == "per_head" else probs.mean(1)
        loss64 = loss64 + (maps * torch.linspace(0, 1, maps.shape[-1], dtype=torch.float64)).sum()
    for name, g, r in zip("qkv", grads, torch.autograd.grad(loss64, (q64, k64, v64))):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_output_layout_merges_heads_without_copy(device):
    q, k, v = make_qkv((2, 4, 10, 16), torch.float16, device, layout="bnhd")
    out, _ = synergistic_attention(q, k, v, backend="triton")
    merged = out.transpose(1, 2).reshape(2, 10, 64)
    assert merged.data_ptr() == out.data_ptr()
    assert out.dtype == torch.float16 and out.shape == (2, 4, 10, 16)


def test_strided_inputs_are_not_copied(device, monkeypatch):
    q, k, v = make_qkv((1, 2, 9, 16), torch.float32, device, layout="bnhd")
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **kw: pytest.fail("hidden copy"))
    out, _ = synergistic_attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 9, 16)


def test_many_batch_heads_beyond_grid_axis_limit():
    """B·H above 65535 (CUDA's limit on grid axes 1 and 2) still launches: the grid is 1-D."""
    from muse_kernels.ops import synergistic_attention as op

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            launches.append(grid)
            return lambda *args, **kwargs: None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(op, "_synergistic_attention_fwd_kernel", Recorder())
        mp.setattr(op, "_synergistic_attention_maps_kernel", Recorder())
        mp.setattr(op, "_synergistic_attention_single_pass_kernel", Recorder())
        # Head dim 128: the flash forward and the maps kernel; 16: the single-pass kernel.
        for dim in (128, 16):
            q = torch.empty(70000, 1, 1, dim, dtype=torch.bfloat16).transpose(1, 2)
            op.synergistic_attention_forward(q, q, q, 0.25, "per_head", torch.float32)
    assert launches == [(70000,), (70000,), (70000,)]


def test_head_mean_equals_mean_of_per_head_maps(device):
    q, k, v = make_qkv((2, 5, 70, 32), torch.float32, device)
    _, per_head = synergistic_attention(q, k, v, return_attn="per_head", backend="triton")
    _, mean = synergistic_attention(q, k, v, return_attn="head_mean", backend="triton")
    torch.testing.assert_close(mean, per_head.mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_head.sum(-1), torch.ones_like(per_head.sum(-1)), rtol=1e-5, atol=1e-5)


def test_tf32_switch_is_honoured(monkeypatch):
    from muse_kernels.ops.synergistic_attention import _input_precision

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert _input_precision(torch.float32) == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert _input_precision(torch.float32) == "tf32"


# --------------------------------------------------------------------------------------------- errors

def _qkv(shape=(1, 2, 8, 16), dtype=torch.float32):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("make_args,kwargs,exc,match", [
    (lambda: (torch.randn(2, 8, 16), *_qkv()[1:]), {}, ValueError, "q must be 4-D"),
    # k, v may have their own length (cross-attention, KV caches), but not different lengths.
    (lambda: (_qkv()[0], torch.randn(1, 2, 9, 16), _qkv()[2]), {}, ValueError, "v must have k's shape"),
    (lambda: (_qkv()[0], *_qkv((1, 2, 8, 32))[1:]), {}, ValueError, "k, v must have q's batch size and head_dim"),
    (lambda: (*_qkv()[:2], torch.randn(1, 2, 8, 16, dtype=torch.float16)), {}, TypeError, "v must have q's dtype"),
    (lambda: _qkv(dtype=torch.float64), {"backend": "triton"}, TypeError, "q must be float32, float16 or bfloat16"),
    (lambda: _qkv(dtype=torch.int32), {}, TypeError, "q must be float32, float16 or bfloat16"),
    (lambda: (_qkv()[0], [1.0], _qkv()[2]), {}, TypeError, "k must be a torch.Tensor"),
    (lambda: _qkv((1, 2, 0, 16)), {}, ValueError, "seq_len"),
    (lambda: _qkv((1, 2, 8, 48)), {"backend": "triton"}, ValueError, "head_dim"),
    (lambda: _qkv(), {"return_attn": "mean"}, ValueError, "return_attn"),
    (lambda: _qkv(), {"attn_dtype": torch.float16}, TypeError, "attn_dtype"),
    (lambda: _qkv(), {"backend": "flash"}, ValueError, "backend must be one of"),
    (lambda: _qkv(), {"backend": "cuda"}, ValueError, "backend='cuda' .* needs CUDA tensors"),
    (lambda: _qkv(), {"scale": -1.0}, ValueError, "scale"),
    (lambda: _qkv(), {"shield": 1}, TypeError, "shield"),
])
def test_bad_input_raises_clear_error(make_args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        synergistic_attention(*make_args(), **kwargs)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without CUDA devices")
def test_mismatched_devices_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="v must be on q's device"):
        synergistic_attention(q, k, v.to("meta"))


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        synergistic_attention(*_qkv(), backend="triton")


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("seq", (64, 256, 1024))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shield,return_attn", list(itertools.product((True, False), MODES)))
def test_parity_muse_shapes_gpu(seq, dtype, shield, return_attn):
    check_parity((32, 8, seq, 64), dtype, torch.device("cuda"), return_attn=return_attn, shield=shield,
                 layout="bnhd")


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_mixed_dtypes_under_autocast_run_in_the_autocast_dtype(backend, device):
    q, k, _ = make_qkv((1, 2, 12, 16), torch.float32, device)
    v = torch.randn(1, 2, 12, 16, device=device, dtype=torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, attn = synergistic_attention(q, k, v, return_attn="per_head", backend=backend)
    assert out.dtype == torch.bfloat16 and attn.dtype == torch.float32
    expected, _ = synergistic_attention(q.bfloat16(), k.bfloat16(), v, backend=backend)
    torch.testing.assert_close(out, expected)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        synergistic_attention(q, k, v, backend=backend)


class _PassThrough(TorchDispatchMode):
    """Any active dispatch mode sends calls through the registered custom ops."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("return_attn", MODES, ids=str)
def test_eager_path_and_custom_ops_agree_exactly(return_attn, device):
    """Eager calls skip the custom-op dispatcher (host overhead); both routes must run the same
    launchers with the same gradient routing, so their results are bitwise equal."""
    q, k, v = make_qkv((2, 3, 37, 32), torch.float32, device)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(q.shape, generator=gen).to(device)
    grad_attn = None
    if return_attn is not None:
        attn_shape = (2, 37, 37) if return_attn == "head_mean" else (2, 3, 37, 37)
        grad_attn = torch.randn(attn_shape, generator=gen).to(device)
    args = dict(backend="triton", return_attn=return_attn, shield=True, attn_dtype=torch.float32,
                grad_out=grad_out, grad_attn=grad_attn)
    eager = _run(q, k, v, **args)
    with _PassThrough() as mode:
        via_ops = _run(q, k, v, **args)
    assert "muse_kernels.synergistic_attention_fwd" in mode.ops
    assert "muse_kernels.synergistic_attention_bwd" in mode.ops
    for a, b in zip(eager, via_ops):
        if a is None:
            assert b is None
        else:
            assert torch.equal(a, b)


def test_eager_path_is_taken_for_plain_tensors(device):
    q, k, v = (x.requires_grad_() for x in make_qkv((1, 2, 9, 16), torch.float32, device))
    out, _ = synergistic_attention(q, k, v, backend="triton")
    assert type(out.grad_fn).__name__ == "EagerAttentionBackward"
    with _PassThrough():
        out, _ = synergistic_attention(q, k, v, backend="triton")
    assert type(out.grad_fn).__name__ != "EagerAttentionBackward"


def test_double_backward_is_refused_clearly(device):
    q, k, v = (x.requires_grad_() for x in make_qkv((1, 2, 9, 16), torch.float32, device))
    _, attn = synergistic_attention(q, k, v, return_attn="per_head", backend="triton")
    (dq,) = torch.autograd.grad(attn.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        dq.sum().backward()


@pytest.mark.parametrize("return_attn", (None, "head_mean"))
def test_inference_calls_skip_the_autograd_node(return_attn, device):
    """Without inputs that need gradients (teachers, evaluation) the launcher runs directly: same
    outputs as a training call, no graph."""
    q, k, v = make_qkv((2, 3, 40, 32), torch.bfloat16, device)
    out, attn = synergistic_attention(q, k, v, return_attn=return_attn, backend="triton")
    assert out.grad_fn is None and not out.requires_grad
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out_t, attn_t = synergistic_attention(qt, kt, vt, return_attn=return_attn, backend="triton")
    assert out_t.grad_fn is not None
    assert torch.equal(out, out_t.detach()) and (attn is None) == (attn_t is None)
    if attn is not None:
        assert torch.equal(attn, attn_t.detach())
    with torch.no_grad():
        out_n, _ = synergistic_attention(qt, kt, vt, return_attn=return_attn, backend="triton")
    assert out_n.grad_fn is None and torch.equal(out_n, out)
