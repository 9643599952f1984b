"""SynergisticAttention module: official parameter names, backend parity, gradient routing, rotary
embedding, torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch

from muse_kernels import SynergisticAttention, apply_rotary

OFFICIAL_KEYS = {"q_topo.weight", "k_topo.weight", "v_sem.weight", "q_norm.weight", "k_norm.weight",
                 "proj.weight"}


def _pair(device, **kwargs):
    torch.manual_seed(0)
    fused = SynergisticAttention(64, num_heads=4, backend="triton", **kwargs).to(device)
    eager = SynergisticAttention(64, num_heads=4, backend="torch", **kwargs)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def test_state_dict_uses_official_names():
    assert set(SynergisticAttention(64, num_heads=4).state_dict()) == OFFICIAL_KEYS


@pytest.mark.parametrize("return_attn", (None, "per_head", "head_mean"))
def test_triton_module_matches_eager_module(return_attn, device):
    fused, eager = _pair(device)
    x = torch.randn(2, 23, 64)
    results = []
    for module, inp in ((fused, x.to(device)), (eager, x)):
        res = module(inp, return_attn=return_attn)
        out, attn = (res, None) if return_attn is None else res
        loss = (out.float() ** 2).sum()
        if attn is not None:
            loss = loss + (attn.float() * torch.arange(23.0, device=attn.device)).sum()
        loss.backward()
        # The eager reference leaves shielded q/k weights out of the graph (grad None) when no map
        # loss exists; the fused op gives them exact zeros.
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in module.named_parameters()}
        results.append((out.detach().cpu(), {n: g.cpu() for n, g in grads.items()}))
    (out_f, grads_f), (out_e, grads_e) = results
    torch.testing.assert_close(out_f, out_e, rtol=1e-4, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def test_output_loss_never_reaches_topology_weights(device):
    fused, _ = _pair(device)
    out, attn = fused(torch.randn(2, 9, 64, device=device), return_attn="head_mean")
    out.pow(2).sum().backward()
    for name in ("q_topo", "k_topo", "q_norm", "k_norm"):
        assert getattr(fused, name).weight.grad is None, name
    for name in ("v_sem", "proj"):
        assert torch.count_nonzero(getattr(fused, name).weight.grad) > 0, name


def test_rotary_matches_complex_rotation():
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    pos = torch.arange(7, dtype=torch.float64)[None, :, None, None]
    theta = 100.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * pos * theta)
    expected = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(apply_rotary(x.float(), base=100.0, layout="BNHD").double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16).expand(1, 12, 1, 16), torch.randn(1, 1, 1, 16).expand(1, 12, 1, 16)
    rq, rk = apply_rotary(q.double(), layout="BNHD"), apply_rotary(k.double(), layout="BNHD")
    scores = torch.einsum("bmhd,bnhd->mn", rq, rk)
    # The tables are fp32 by design, so fp32 tolerances.
    torch.testing.assert_close(scores[3, 1], scores[9, 7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[0, 5], scores[6, 11], rtol=1e-5, atol=1e-5)
    assert not torch.isclose(scores[3, 1], scores[3, 2])


def test_rotary_takes_its_layout_by_name_and_rotates_over_the_tokens():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)  # (B, H, N, D): 3 heads, 7 tokens
    # Without a name the layout used to be taken as (B, N, H, D): this tensor was rotated across its heads.
    with pytest.raises(ValueError, match=r"apply_rotary needs layout='BNHD' .* or 'BHND'"):
        apply_rotary(x)
    with pytest.raises(ValueError, match="layout='BHDN'"):
        apply_rotary(x, layout="BHDN")
    by_tokens = apply_rotary(x.transpose(1, 2), layout="BNHD").transpose(1, 2)
    torch.testing.assert_close(apply_rotary(x, layout="BHND"), by_tokens)
    # Token 0 is never rotated, in either layout; every other token is.
    torch.testing.assert_close(apply_rotary(x, layout="BHND")[:, :, 0], x[:, :, 0])
    assert not torch.allclose(apply_rotary(x, layout="BHND")[:, :, 1], x[:, :, 1])
    with pytest.raises(ValueError, match="head dim .* must be even, got 7"):
        apply_rotary(torch.randn(1, 2, 3, 7), layout="BNHD")


def _check_compile_fullgraph(backend, device, dim):
    torch.manual_seed(0)
    module = SynergisticAttention(dim, num_heads=2, backend=backend).to(device)
    x = torch.randn(2, 10, dim, device=device)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out_c, attn_c = compiled(x, return_attn="per_head")
    (out_c.sum() + attn_c.pow(2).sum()).backward()
    grads_c = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    out_e, attn_e = module(x, return_attn="per_head")
    (out_e.sum() + attn_e.pow(2).sum()).backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(attn_c, attn_e)
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads_c[name], p.grad, msg=name)


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_compile_fullgraph_without_graph_break(backend, device):
    _check_compile_fullgraph(backend, device, 32)


@pytest.mark.gpu
def test_compile_fullgraph_cuda_backend_gpu():
    _check_compile_fullgraph("cuda", torch.device("cuda"), 128)  # head dim 64


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_training_step_replays_from_a_cuda_graph_gpu(backend):
    """Static-shape steps are host-bound at MUSE sizes; the README points to CUDA graphs. A captured
    forward + fused topology loss + backward must replay to the eager step's gradients."""
    torch.manual_seed(0)
    module = SynergisticAttention(128, num_heads=2, backend=backend).cuda()  # head dim 64
    x = torch.randn(2, 37, 128, device="cuda")
    teacher = torch.softmax(torch.randn(2, 37, 37, device="cuda"), dim=-1)

    def step():
        out, loss = module(x, teacher=teacher, validate_teacher=False)
        (out.square().mean() + loss).backward()

    from benchmarks.common import cuda_graphed

    step()
    eager = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    replay = cuda_graphed(step)  # the captured step accumulates into the existing .grad tensors
    for p in module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    replay()
    torch.cuda.synchronize()
    replayed = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert replayed.keys() == eager.keys() and "q_topo.weight" in eager
    for name in eager:
        torch.testing.assert_close(replayed[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_constructor_and_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SynergisticAttention(65, num_heads=8)
    with pytest.raises(ValueError, match=r"x must be \(batch, tokens, dim\)"):
        SynergisticAttention(64, num_heads=4)(torch.randn(64))


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_module_runs_under_bf16_autocast(backend, device):
    """Under autocast the linears give bf16 while RMSNorm may give fp32: the op runs in bf16."""
    torch.manual_seed(0)
    module = SynergisticAttention(32, num_heads=2, backend=backend).to(device)
    x = torch.randn(2, 10, 32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, attn = module(x, return_attn="head_mean")
    assert out.dtype == torch.bfloat16 and attn.dtype == torch.float32
    out.float().sum().backward()
    assert module.v_sem.weight.grad is not None
    reference = module(x, return_attn="head_mean")[0]
    torch.testing.assert_close(out.float(), reference, rtol=5e-2, atol=5e-2)
