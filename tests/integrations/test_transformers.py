"""The "muse" attention implementation in tiny random transformers models: outputs, attention weights
and gradients against the models' own eager attention (same dtype) and an fp64 eager reference, with
the FlashAttention rule; masks, causal decoding with a KV cache, GQA, padding, dropout, head dims."""

from __future__ import annotations

import pytest
import torch

import models
from conftest import REFERENCE
from helpers import assert_flash_rule
from muse_kernels.integrations import transformers as muse_hf

VISION = {"vit": models.vit, "dinov3": models.dinov3, "internvl_vision": models.internvl_vision}
TEXT = {"clip_text": models.clip_text, "qwen2": models.qwen2}


def _inputs(family, device, dtype):
    if family in VISION:
        return {"pixel_values": models.pixels().to(device=device, dtype=dtype).requires_grad_()}
    ids, mask = models.text_batch()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _forward_backward(model, inputs, dtype):
    """Hidden states and per-head weights of every layer, then the gradients of a loss on both, with
    respect to every parameter and the pixels."""
    inputs = {k: (v.detach().to(dtype).requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    out = model(**inputs, output_attentions=True)
    gen = torch.Generator().manual_seed(7)
    hidden = out.last_hidden_state
    loss = (hidden * torch.randn(hidden.shape, generator=gen).to(hidden)).sum()
    loss = loss + (out.attentions[-1] * torch.randn(out.attentions[-1].shape, generator=gen).to(hidden)).sum()
    wrt = [p for p in model.parameters()] + [v for v in inputs.values() if v.is_floating_point()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    names = [n for n, _ in model.named_parameters()] + [k for k, v in inputs.items() if v.is_floating_point()]
    return hidden, out.attentions, dict(zip(names, grads))


def check_model(family, device, dtype=torch.float32):
    build = {**VISION, **TEXT}[family]
    torch.manual_seed(0)
    model = build().to(device)
    inputs = _inputs(family, device, dtype)
    ours = _forward_backward(models.twin(model, "muse", dtype), inputs, dtype)
    eager = _forward_backward(models.twin(model, "eager", dtype), inputs, dtype)
    ref = _forward_backward(models.twin(model, REFERENCE, torch.float64), inputs, torch.float64)

    assert_flash_rule("last_hidden_state", ours[0], eager[0], ref[0], dtype)
    assert len(ours[1]) == len(eager[1]) == len(ref[1]) > 0
    for layer, (a, e, r) in enumerate(zip(ours[1], eager[1], ref[1])):
        assert a.dtype == e.dtype, f"layer {layer}: attention weights {a.dtype}, eager {e.dtype}"
        assert_flash_rule(f"attentions[{layer}]", a, e, r, dtype)
    for name, r in ref[2].items():
        a, e = ours[2][name], eager[2][name]
        if r is None:
            assert a is None and e is None, name
            continue
        assert_flash_rule(f"grad {name}", a, e, r, dtype)


@pytest.mark.parametrize("family", [*VISION, *TEXT])
def test_model_matches_eager_fp32(family, device):
    check_model(family, device)


@pytest.mark.parametrize("family", ["dinov3", "qwen2"])
def test_model_matches_eager_bf16(family, device):
    check_model(family, device, torch.bfloat16)


def test_no_maps_are_written_without_output_attentions(device, maps_launches):
    model = models.twin(models.dinov3().to(device), "muse")
    out = model(pixel_values=models.pixels().to(device))
    assert out.attentions is None and maps_launches.launches == 0
    out = model(pixel_values=models.pixels().to(device), output_attentions=True)
    assert len(out.attentions) == 3 and maps_launches.launches == 3


def test_output_attentions_reaches_models_that_do_not_pass_it_down(device):
    """InternVL's vision tower calls its encoder without the kwargs: the weights must still come."""
    model = models.twin(models.internvl_vision().to(device), "muse")
    out = model(pixel_values=models.pixels().to(device), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 17, 17)
    # transformers refuses config.output_attentions on other implementations than eager, but a config
    # that had it set keeps it when the implementation changes.
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    model.set_attn_implementation("muse")
    assert len(model(pixel_values=models.pixels().to(device)).attentions) == 2


def test_qwen2_kv_cache_decoding_matches_eager(device):
    """Prefill, a one-token step and a three-token chunk after the cache (N_q != N_k, causal)."""
    torch.manual_seed(0)
    base = models.qwen2().to(device)
    ids = torch.randint(1, 99, (2, 11), generator=torch.Generator().manual_seed(3)).to(device)
    results = {}
    for name in ("muse", "eager", REFERENCE):
        model = models.twin(base, name, torch.float64 if name == REFERENCE else torch.float32)
        first = model(input_ids=ids[:, :7], use_cache=True)
        step = model(input_ids=ids[:, 7:8], cache=first.past_key_values, use_cache=True,
                     output_attentions=True)
        chunk = model(input_ids=ids[:, 8:], cache=step.past_key_values, output_attentions=True)
        results[name] = (first.last_hidden_state, step.last_hidden_state, chunk.last_hidden_state,
                         *step.attentions, *chunk.attentions)
    assert results["muse"][3].shape == (2, 4, 1, 8) and results["muse"][5].shape == (2, 4, 3, 11)
    for i, (a, e, r) in enumerate(zip(results["muse"], results["eager"], results[REFERENCE])):
        assert_flash_rule(f"output {i}", a, e, r, torch.float32)


def test_static_cache_prefill_matches_eager(device):
    """The one case transformers leaves to SDPA's top-left causal mask: no mask, N_k (the cache size)
    > N_q. The empty cache slots get weight 0, and the weights keep eager's (B, H, N_q, N_k) shape."""
    from transformers import StaticCache

    torch.manual_seed(0)
    base = models.qwen2().to(device)
    ids = torch.randint(1, 99, (1, 6), generator=torch.Generator().manual_seed(4)).to(device)
    results = {}
    for name in ("muse", "eager", REFERENCE):
        dtype = torch.float64 if name == REFERENCE else torch.float32
        model = models.twin(base, name, dtype)
        cache = StaticCache(config=model.config, max_cache_len=16)
        out = model(input_ids=ids, cache=cache, use_cache=True, output_attentions=True)
        results[name] = (out.last_hidden_state, *out.attentions)
    assert results["muse"][1].shape == (1, 4, 6, 16)
    assert torch.all(results["muse"][1][..., 6:] == 0)
    for i, (a, e, r) in enumerate(zip(results["muse"], results["eager"], results[REFERENCE])):
        assert_flash_rule(f"output {i}", a, e, r, torch.float32)


def test_unsupported_head_dim_is_zero_padded(device):
    """Head dim 24 runs on the head-dim-32 kernels with zero padding: same numbers as eager."""
    torch.manual_seed(0)
    base = models.vit(hidden=96, heads=4).to(device)
    pixels = models.pixels().to(device)
    ours = models.twin(base, "muse")(pixel_values=pixels, output_attentions=True)
    eager = models.twin(base, "eager")(pixel_values=pixels, output_attentions=True)
    ref = models.twin(base, REFERENCE, torch.float64)(pixel_values=pixels.double(), output_attentions=True)
    assert_flash_rule("hidden", ours.last_hidden_state, eager.last_hidden_state, ref.last_hidden_state, torch.float32)
    assert_flash_rule("attn", ours.attentions[-1], eager.attentions[-1], ref.attentions[-1], torch.float32)


def test_dropout_is_refused_in_training_and_ignored_in_eval(device):
    model = models.twin(models.dinov3(attention_dropout=0.1).to(device), "muse")
    pixels = models.pixels().to(device)
    model(pixel_values=pixels)  # eval: eager's dropout is a no-op too
    model.train()
    with pytest.raises(ValueError, match=r"dropout only at p = 0 .* got p = 0.1"):
        model(pixel_values=pixels)


def test_unsupported_arguments_raise_clearly():
    q = torch.zeros(1, 1, 2, 16)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="does not support `softcap`"):
        muse_hf.muse_attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        muse_hf.register(backend="flash")
