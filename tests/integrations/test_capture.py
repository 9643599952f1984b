"""muse_kernels.capture_attention: the maps of the chosen layers only, exactly eager's, for tiny random
transformers models; one map write per chosen layer; output_attentions unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from conftest import REFERENCE
from helpers import assert_flash_rule
from muse_kernels import capture_attention


def _eager_maps(base, pixels):
    eager = models.twin(base, "eager")(pixel_values=pixels, output_attentions=True).attentions
    ref = models.twin(base, REFERENCE, torch.float64)(pixel_values=pixels.double(), output_attentions=True).attentions
    return eager, ref


def test_dinov3_last_layer_head_mean_is_eager_and_the_only_map_written(device, maps_launches):
    """The MUSE teacher's use: DINOv3 (CLS, registers, patches) on eager attention, the last layer's
    head mean for the price of one map write; the model is back on eager afterwards."""
    torch.manual_seed(0)
    base = models.dinov3().to(device)
    model = models.twin(base, "eager")
    pixels = models.pixels().to(device)
    with capture_attention(model, layers=[-1], kind="head_mean") as maps:
        assert model.config._attn_implementation == "muse"
        out = model(pixel_values=pixels)
    assert model.config._attn_implementation == "eager"
    assert out.attentions is None and maps_launches.launches == 1
    assert len(maps) == 3 and maps.layers == (2,) and maps[0] is None and maps[1] is None
    eager, ref = _eager_maps(base, pixels)
    assert maps[-1].shape == (2, 21, 21) and maps[-1].dtype == torch.float32
    assert_flash_rule("head mean", maps[-1], eager[-1].mean(1), ref[-1].mean(1), torch.float32)


def test_per_head_maps_of_several_layers_in_bf16(device):
    torch.manual_seed(0)
    base = models.vit().to(device)
    model = models.twin(base, "muse")
    pixels = models.pixels().to(device)
    with capture_attention(model, layers=[0, -1], kind="per_head", dtype=torch.bfloat16) as maps:
        model(pixel_values=pixels)
    eager, ref = _eager_maps(base, pixels)
    assert model.config._attn_implementation == "muse"
    for layer in (0, 1):
        assert maps[layer].dtype == torch.bfloat16 and maps[layer].shape == (2, 4, 17, 17)
        # Written in bf16 by the kernel: within bf16 rounding of the exact maps.
        torch.testing.assert_close(maps[layer].double(), ref[layer], rtol=2 ** -8, atol=1e-6)


def test_capture_alongside_output_attentions(device, maps_launches):
    """output_attentions still returns every layer's per-head weights; the capture gets its layer's
    head mean from the same maps (one write per layer)."""
    torch.manual_seed(0)
    base = models.dinov3().to(device)
    model = models.twin(base, "muse")
    pixels = models.pixels().to(device)
    with capture_attention(model, layers=1) as maps:
        out = model(pixel_values=pixels, output_attentions=True)
    eager, ref = _eager_maps(base, pixels)
    assert maps_launches.launches == 3 and maps[0] is None and maps[2] is None
    for layer in range(3):
        assert_flash_rule(f"attentions[{layer}]", out.attentions[layer], eager[layer], ref[layer], torch.float32)
    torch.testing.assert_close(maps[1], out.attentions[1].mean(1), rtol=1e-6, atol=1e-7)


def test_decoder_with_padding_and_gqa(device):
    """Qwen2 (GQA, causal) with right and left padding: fully masked rows as eager defines them."""
    torch.manual_seed(0)
    base = models.qwen2().to(device)
    ids, mask = (x.to(device) for x in models.text_batch())
    model = models.twin(base, "muse")
    with capture_attention(model, layers=[-1], kind="per_head") as maps:
        model(input_ids=ids, attention_mask=mask)
    eager = models.twin(base, "eager")(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    ref = models.twin(base, REFERENCE, torch.float64)(input_ids=ids, attention_mask=mask,
                                                       output_attentions=True).attentions
    assert maps[0] is None
    assert_flash_rule("per-head maps", maps[-1], eager[-1], ref[-1], torch.float32)


def test_gradients_through_captured_maps(device):
    """A loss on the captured head mean trains the model as the same loss on eager's maps does."""
    torch.manual_seed(0)
    base = models.internvl_vision().to(device)
    pixels = models.pixels().to(device)
    weight = torch.randn(2, 17, 17, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for name, dtype in (("muse", torch.float32), ("eager", torch.float32), (REFERENCE, torch.float64)):
        model = models.twin(base, "eager" if name == "muse" else name, dtype)
        if name == "muse":
            with capture_attention(model, layers=[-1]) as maps:
                out = model(pixel_values=pixels)
            head_mean = maps[-1]
        else:
            out = model(pixel_values=pixels.to(dtype), output_attentions=True)
            head_mean = out.attentions[-1].mean(1)
        loss = (head_mean * weight.to(dtype)).sum() + out.last_hidden_state.square().mean()
        results.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    names = [n for n, _ in base.named_parameters()]
    for name, a, e, r in zip(names, *results):
        if r is None:
            continue
        assert_flash_rule(f"grad {name}", a, e, r, torch.float32)


def test_a_module_holding_a_transformers_model(device):
    """E.g. a tokenizer holding its teacher: the attention layers are found inside."""
    holder = nn.ModuleDict({"proj": nn.Linear(2, 2), "teacher": models.twin(models.vit().to(device), "eager")})
    with capture_attention(holder, layers=[-1]) as maps:
        holder["teacher"](pixel_values=models.pixels().to(device))
    assert maps[-1].shape == (2, 17, 17) and holder["teacher"].config._attn_implementation == "eager"


def test_the_implementation_is_restored_when_the_forward_fails(device):
    model = models.twin(models.vit().to(device), "sdpa")
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"kind": "mean"}, ValueError, "kind must be one of"),
    ({"layers": [5]}, ValueError, "layer 5 is out of range: the model has 2 attention layers"),
    ({"layers": [-3]}, ValueError, "out of range"),
    ({"layers": [1, -1]}, ValueError, "name a layer twice"),
    ({"layers": []}, TypeError, "non-empty sequence"),
    ({"layers": [True]}, TypeError, "layers must hold ints"),
    ({"dtype": torch.int8}, TypeError, "dtype must be a floating"),
])
def test_bad_arguments_raise_clearly(kwargs, exc, match):
    model = models.vit()
    with pytest.raises(exc, match=match):
        with capture_attention(model, **kwargs):
            pass


def test_a_model_without_attention_layers_is_refused():
    with pytest.raises(ValueError, match="found no attention layers in Linear"):
        with capture_attention(nn.Linear(2, 2)):
            pass
