"""The general attention path of the Triton op (what transformers models need): query and key lengths
that differ, a bottom-right aligned causal mask, 4-D boolean or additive masks with fully masked rows,
grouped-query attention; ordinary (unshielded) gradients. Everything against an fp64 eager
reference written here (transformers' eager formula), with the FlashAttention rule."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_flash_rule
from muse_kernels import synergistic_attention

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = (None, "per_head", "head_mean")


def eager_fp64(q, k, v, attn_mask, causal, scale):
    """transformers' eager attention in fp64: masked logits get finfo.min added (a fully masked row is
    then uniform), GQA by repeating the kv heads, bottom-right causal alignment."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    logits = (q @ k.transpose(-1, -2)) * scale
    n_q, n_k = q.shape[2], k.shape[2]
    minimum = torch.finfo(torch.float64).min
    bias = torch.zeros(1, 1, n_q, n_k, dtype=torch.float64)
    if causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
        bias = bias.masked_fill(~keep, minimum)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask, minimum)
        else:
            extra = attn_mask.double()
            bias = torch.where(bias == minimum, bias, torch.where(extra < -1e29, minimum, bias + extra))
    probs = torch.softmax(logits + bias, dim=-1)
    return probs @ v, probs


def make_inputs(bsz, heads, kv_heads, n_q, n_k, dim, dtype, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        q = torch.randn(bsz, heads, n_q, dim, generator=gen)
        k, v = torch.randn(2, bsz, kv_heads, n_k, dim, generator=gen)
        return q.to(dtype), k.to(dtype).contiguous(), v.to(dtype).contiguous()
    # Views of (B, N, H, D) projection outputs, as transformers models hand them over.
    q = torch.randn(bsz, n_q, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    kv = torch.randn(bsz, n_k, 2, kv_heads, dim, generator=gen).to(dtype)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def make_mask(kind, bsz, heads, n_q, n_k, seed=3):
    """``padding``: (B, 1, 1, N_k) key padding, one batch row with every key masked; ``bool``: a full
    (B, 1, N_q, N_k) boolean mask with fully masked rows; ``additive``: a (1, H, N_q, N_k) float bias
    with finfo.min and -inf entries and fully masked rows; ``additive_bf16``: the same in bf16."""
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "padding":
        mask = torch.rand(bsz, 1, 1, n_k, generator=gen) > 0.3
        mask[:, :, :, 0] = True
        mask[-1] = False
        return mask
    if kind == "bool":
        mask = torch.rand(bsz, 1, n_q, n_k, generator=gen) > 0.4
        mask[:, :, n_q // 2] = False
        return mask
    bias = torch.randn(1, heads, n_q, n_k, generator=gen)
    bias = bias.masked_fill(torch.rand(1, heads, n_q, n_k, generator=gen) > 0.6, torch.finfo(torch.float32).min)
    bias[:, 0, n_q // 2] = float("-inf")
    if n_k > 1:
        bias[:, -1, 0, 1:] = torch.finfo(torch.float32).min
    return bias.to(torch.bfloat16) if kind == "additive_bf16" else bias


def _run(q, k, v, *, backend, return_attn, attn_mask, causal, grad_out, grad_attn):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, attn = synergistic_attention(q, k, v, return_attn=return_attn, shield=False, backend=backend,
                                      attn_mask=attn_mask, causal=causal)
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if grad_attn is not None:
        outputs.append(attn)
        grads.append(grad_attn.to(attn.dtype))
    return (out, attn, *torch.autograd.grad(outputs, (q, k, v), grads))


def check_general(bsz, heads, kv_heads, n_q, n_k, dim, dtype, device, *, return_attn, mask=None, causal=False,
                  layout="contiguous", maps_in_loss=True):
    q, k, v = (x.to(device) for x in make_inputs(bsz, heads, kv_heads, n_q, n_k, dim, dtype, layout))
    attn_mask = make_mask(mask, bsz, heads, n_q, n_k)
    attn_mask = None if attn_mask is None else attn_mask.to(device)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(bsz, heads, n_q, dim, generator=gen, dtype=torch.float64)
    grad_attn = None
    if return_attn is not None and maps_in_loss:
        shape = (bsz, heads, n_q, n_k) if return_attn == "per_head" else (bsz, n_q, n_k)
        grad_attn = torch.randn(shape, generator=gen, dtype=torch.float64)
    args = dict(return_attn=return_attn, attn_mask=attn_mask, causal=causal, grad_out=grad_out.to(device),
                grad_attn=None if grad_attn is None else grad_attn.to(device))
    ours = _run(q, k, v, backend="triton", **args)
    same_dtype = _run(q, k, v, backend="torch", **args)

    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out64, probs64 = eager_fp64(q64, k64, v64, None if attn_mask is None else attn_mask.cpu(), causal, dim ** -0.5)
    maps64 = probs64 if return_attn == "per_head" else probs64.mean(1)
    outputs, grads = [out64], [grad_out]
    if grad_attn is not None:
        outputs.append(maps64)
        grads.append(grad_attn)
    ref = (out64, maps64, *torch.autograd.grad(outputs, (q64, k64, v64), grads))
    for name, o, e, r in zip(("out", "attn", "dq", "dk", "dv"), ours, same_dtype, ref):
        if name == "attn" and return_attn is None:
            assert o is None and e is None
            continue
        assert o.shape == r.shape and o.dtype == e.dtype, f"{name}: {o.shape}/{o.dtype} vs {r.shape}/{e.dtype}"
        assert_flash_rule(name, o.cpu(), e.cpu(), r, dtype)
    return ours


# (B, H, H_kv, N_q, N_k, D, mask, causal): N = 1, primes, lengths past one and two blocks (64), both
# N_q < N_k and N_q > N_k (causal rows with no visible key are fully masked), GQA and MQA.
CASES = [
    (1, 2, 2, 1, 1, 16, None, True),
    (2, 2, 1, 1, 37, 16, None, True),            # decoding: one query, a KV cache
    (1, 2, 2, 37, 1, 16, None, False),
    (1, 4, 2, 17, 67, 32, None, True),           # prefill after a cache, GQA
    (1, 2, 2, 130, 67, 16, None, True),          # N_q > N_k: the first 63 rows see no key
    (1, 3, 1, 100, 100, 16, None, True),         # MQA, causal blocks skipped
    (2, 2, 2, 17, 150, 16, "padding", False),    # key padding, one sample fully padded
    (2, 4, 2, 67, 67, 16, "bool", True),         # bool mask with fully masked rows, plus causal
    (1, 2, 1, 70, 7, 32, "additive", False),     # additive fp32 mask with finfo.min and -inf
    (1, 2, 2, 29, 100, 16, "additive_bf16", True),
]
CASE_IDS = [f"B{c[0]}H{c[1]}kv{c[2]}q{c[3]}k{c[4]}D{c[5]}-{c[6]}{'-causal' if c[7] else ''}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("return_attn", MODES, ids=str)
def test_general_parity_grid(case, dtype, return_attn, device):
    bsz, heads, kv_heads, n_q, n_k, dim, mask, causal = case
    check_general(bsz, heads, kv_heads, n_q, n_k, dim, dtype, device, return_attn=return_attn, mask=mask,
                  causal=causal)


# Every head dim, strided (B, N, H, D) views, maps written but outside the loss.
@pytest.mark.parametrize("dim", (16, 32, 64, 128))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_general_head_dims_and_strided_views(dim, dtype, device):
    check_general(1, 4, 2, 23, 41, dim, dtype, device, return_attn="head_mean", mask="padding", causal=True,
                  layout="bnhd", maps_in_loss=False)


def test_fully_masked_rows_attend_uniformly_to_every_key(device):
    """As in transformers' eager attention: a row with no visible key averages all values."""
    q, k, v = (x.to(device) for x in make_inputs(1, 2, 2, 9, 40, 16, torch.float32))
    mask = torch.ones(1, 1, 9, 40, dtype=torch.bool, device=device)
    mask[..., 4, :] = False
    out, attn = synergistic_attention(q, k, v, return_attn="per_head", shield=False, backend="triton",
                                      attn_mask=mask)
    torch.testing.assert_close(attn[:, :, 4], torch.full_like(attn[:, :, 4], 1 / 40), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[:, :, 4], v.mean(2), rtol=1e-5, atol=1e-6)
    # The other rows see none of row 4's change: the mask is per entry.
    full, _ = synergistic_attention(q, k, v, shield=False, backend="triton", attn_mask=torch.ones_like(mask))
    torch.testing.assert_close(out[:, :, :4], full[:, :, :4], rtol=0, atol=0)


@pytest.mark.parametrize("n_q,n_k", [(5, 70), (70, 70), (70, 9)])
def test_causal_is_bottom_right_aligned(n_q, n_k, device):
    """causal=True is the boolean mask ``tril(diagonal=N_k − N_q)``: query i is the (N_k − N_q + i)-th
    position, as for the last N_q tokens of a KV cache (transformers' convention)."""
    q, k, v = (x.to(device) for x in make_inputs(1, 2, 1, n_q, n_k, 16, torch.float32))
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)
    causal = synergistic_attention(q, k, v, return_attn="per_head", shield=False, backend="triton", causal=True)
    masked = synergistic_attention(q, k, v, return_attn="per_head", shield=False, backend="triton",
                                   attn_mask=keep[None, None])
    for a, b in zip(causal, masked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Rows with a visible key give the keys after their position exactly 0 (rows with none are uniform).
    hidden = ~keep & keep.any(-1, keepdim=True)
    assert hidden.any() and torch.all(causal[1][..., hidden] == 0)


def test_grouped_query_attention_equals_repeated_kv_heads(device):
    q, k, v = (x.to(device).requires_grad_() for x in make_inputs(1, 6, 2, 20, 33, 16, torch.float32))
    out, attn = synergistic_attention(q, k, v, return_attn="per_head", shield=False, backend="triton", causal=True)
    grads = torch.autograd.grad((out * out).sum() + attn.sum(), (q, k, v))
    k_rep, v_rep = (x.detach().repeat_interleave(3, dim=1).requires_grad_() for x in (k, v))
    q_rep = q.detach().requires_grad_()
    out_r, attn_r = synergistic_attention(q_rep, k_rep, v_rep, return_attn="per_head", shield=False,
                                          backend="triton", causal=True)
    dq_r, dk_r, dv_r = torch.autograd.grad((out_r * out_r).sum() + attn_r.sum(), (q_rep, k_rep, v_rep))
    torch.testing.assert_close(out, out_r, rtol=0, atol=0)
    torch.testing.assert_close(attn, attn_r, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], dq_r, rtol=1e-6, atol=1e-6)
    # The kv head's gradient is the sum over the query heads sharing it.
    torch.testing.assert_close(grads[1], dk_r.unflatten(1, (2, 3)).sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[2], dv_r.unflatten(1, (2, 3)).sum(2), rtol=1e-5, atol=1e-6)


class _PassThrough(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_custom_ops_route_agrees_exactly_and_fake_shapes(device):
    """The registered custom ops (torch.compile's route) run the same general launchers."""
    q, k, v = make_inputs(2, 4, 2, 11, 30, 16, torch.float32)
    mask = make_mask("padding", 2, 4, 11, 30)
    args = dict(backend="triton", return_attn="head_mean", attn_mask=mask.to(device), causal=True,
                grad_out=torch.randn(2, 4, 11, 16).to(device), grad_attn=torch.randn(2, 11, 30).to(device))
    q, k, v = (x.to(device) for x in (q, k, v))
    eager = _run(q, k, v, **args)
    with _PassThrough() as mode:
        via_ops = _run(q, k, v, **args)
    assert "muse_kernels.synergistic_attention_fwd" in mode.ops
    assert "muse_kernels.synergistic_attention_bwd" in mode.ops
    for a, b in zip(eager, via_ops):
        assert torch.equal(a, b)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        fq, fk, fv = (fake.from_tensor(x) for x in (q, k, v))
        out, attn = synergistic_attention(fq, fk, fv, return_attn="per_head", shield=False, backend="triton",
                                          attn_mask=fake.from_tensor(args["attn_mask"]), causal=True)
    assert out.shape == (2, 4, 11, 16) and attn.shape == (2, 4, 11, 30)


def test_muse_path_unchanged_by_general_defaults(device):
    """Defaults (no mask, not causal, same shapes) keep MUSE's shielded self-attention."""
    q, k, v = (x.to(device).requires_grad_() for x in make_inputs(1, 2, 2, 9, 9, 16, torch.float32))
    out, _ = synergistic_attention(q, k, v, backend="triton", return_attn="per_head")
    out.sum().backward()
    assert q.grad is None and k.grad is None and v.grad is not None


# --------------------------------------------------------------------------------------------- errors

def _qkv(n_q=8, n_k=8, heads=2, kv_heads=2, dim=16):
    return torch.randn(1, heads, n_q, dim), torch.randn(1, kv_heads, n_k, dim), torch.randn(1, kv_heads, n_k, dim)


@pytest.mark.parametrize("make_args,kwargs,exc,match", [
    (lambda: _qkv(n_k=9), {}, ValueError, "shield=True .* supports only self-attention"),
    (lambda: _qkv(), {"causal": True}, ValueError, "shield=True"),
    (lambda: _qkv(), {"causal": 1, "shield": False}, TypeError, "causal must be a bool"),
    (lambda: _qkv(heads=3), {"shield": False}, ValueError, r"q's heads \(3\) must be a multiple"),
    (lambda: (*_qkv()[:2], torch.randn(1, 2, 9, 16)), {"shield": False}, ValueError, "v must have k's shape"),
    (lambda: (_qkv()[0], *_qkv(dim=32)[1:]), {"shield": False}, ValueError, "q's batch size and head_dim"),
    (lambda: _qkv(), {"shield": False, "attn_mask": torch.ones(1, 2, 8, 7, dtype=torch.bool)}, ValueError,
     "attn_mask must be 4-D and broadcastable"),
    (lambda: _qkv(), {"shield": False, "attn_mask": torch.ones(8, 8, dtype=torch.bool)}, ValueError,
     "attn_mask must be 4-D"),
    (lambda: _qkv(), {"shield": False, "attn_mask": torch.ones(1, 1, 8, 8, dtype=torch.int64)}, TypeError,
     "attn_mask must be bool"),
    (lambda: _qkv(), {"shield": False, "attn_mask": torch.zeros(1, 1, 8, 8, requires_grad=True)}, ValueError,
     "attn_mask must not require grad"),
    (lambda: _qkv(), {"shield": False, "causal": True, "teacher": torch.full((1, 8, 8), 1 / 8)}, ValueError,
     "a teacher .* needs self-attention"),
])
def test_bad_general_input_raises_clear_error(make_args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        synergistic_attention(*make_args(), **kwargs)


def test_teacher_with_general_path_is_refused():
    from muse_kernels.ops.synergistic_attention import synergistic_attention_backward

    q, k, v = _qkv(n_k=9)
    with pytest.raises(ValueError, match="shield must be False and no teacher"):
        synergistic_attention_backward(None, None, q, k, v, None, None, 0.25, shield=True)


def test_backends_without_the_general_path_refuse_it_clearly():
    """The CUDA C++ backend registers MUSE-only launchers (general=False), like this stand-in."""
    from muse_kernels.ops.synergistic_attention import register_attention_ops

    def never_called(*args, **kwargs):
        raise AssertionError("the launcher must not run")

    attention = register_attention_ops("test_muse_only_backend", never_called, never_called)
    q, k, v = _qkv(n_k=9)
    with pytest.raises(ValueError, match="supports only self-attention without masks"):
        attention(q, k, v, 0.25, None, torch.float32, False)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="supports only self-attention without masks"):
        attention(q, k, v, 0.25, None, torch.float32, False, None, True)
