"""MuseTokenizer (tiny config): shapes, gradient routing (exact), fused = materialized topology,
the teacher pipeline, local from_pretrained loading, bad input."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from muse.config import load_config
from muse.models import MuseTokenizer

TOPOLOGY = ("q_topo", "k_topo", "q_norm", "k_norm")


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return MuseTokenizer(load_config("tiny").model)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _block_grads(model, index):
    block = model.muse_blocks[index]
    return {n.removesuffix(".weight"): (torch.zeros_like(p) if p.grad is None else p.grad)
            for n, p in block.named_parameters()}


def test_forward_backward_shapes(model, images):
    out = model(images, text_embeds=torch.randn(2, 16))
    assert out.reconstruction.shape == images.shape
    # The decoder's raw output, as official: no tanh, no clamp (a random decoder overshoots [-1, 1]).
    torch.testing.assert_close(out.reconstruction, model.decoder(out.latents), rtol=0, atol=0)
    assert out.latents.shape == (2, 8, 4, 4)
    assert out.image_embeds.shape == (2, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    assert out.loss_topo.dim() == 0 and out.loss_itc.dim() == 0 and out.maps is None
    (out.reconstruction.mean() + out.loss_topo + out.loss_itc).backward()
    assert all(p.grad is None for p in model.dino_teacher.parameters())
    assert torch.equal(model.encode(images), out.latents.detach())


def test_bf16_autocast_on_cpu(model, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    (out.reconstruction.float().mean() + out.loss_topo).backward()
    assert torch.isfinite(out.loss_topo)


def test_reconstruction_loss_never_reaches_the_supervised_topology_weights(model, images):
    model(images).reconstruction.pow(2).mean().backward()
    grads = _block_grads(model, -1)
    for name in TOPOLOGY:
        assert torch.count_nonzero(grads[name]) == 0, name
    assert torch.count_nonzero(grads["v_sem"]) > 0


def test_topology_loss_reaches_only_topology_weights(model, images):
    model(images).loss_topo.backward()
    grads = _block_grads(model, -1)
    for name in ("v_sem", "proj", "mlp.w1", "mlp.w2", "mlp.w3", "norm2", "v_itc"):
        assert torch.count_nonzero(grads[name]) == 0, name
    for name in TOPOLOGY:
        assert torch.count_nonzero(grads[name]) > 0, name
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.decoder.parameters())


def test_itc_loss_skips_the_last_blocks_attention(model, images):
    model(images, text_embeds=torch.randn(2, 16)).loss_itc.backward()
    grads = _block_grads(model, -1)
    for name in ("q_topo", "k_topo", "v_sem"):
        assert torch.count_nonzero(grads[name]) == 0, name
    assert torch.count_nonzero(grads["v_itc"]) > 0
    assert torch.count_nonzero(_block_grads(model, 0)["v_sem"]) > 0


def test_gradient_scaler_scales_exactly(base_model, images):
    grads = {}
    for scale in (1.0, 0.5):
        model = copy.deepcopy(base_model)
        model.grad_scaler.scale = scale
        model(images).reconstruction.pow(2).mean().backward()
        grads[scale] = _block_grads(model, -1)["v_sem"]
    assert torch.count_nonzero(grads[1.0]) > 0
    torch.testing.assert_close(grads[0.5], grads[1.0] * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ("head_mean", "per_head"))
@pytest.mark.parametrize("supervise", ("last", "all"))
def test_fused_topology_equals_materialized_maps(base_model, images, reduction, supervise):
    # The fused path through the Triton kernels wherever they can run (GPU or interpreter).
    kernels = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    results = []
    for fused in (True, False):
        model = copy.deepcopy(base_model)
        model.cfg = copy.deepcopy(model.cfg)
        model.cfg.topo_reduction, model.cfg.fused_topology = reduction, fused
        for block in model.muse_blocks:
            block.backend = "triton" if fused and kernels else "torch"
        model.supervised = set(range(len(model.muse_blocks))) if supervise == "all" else {len(model.muse_blocks) - 1}
        out = model(images)
        (out.loss_topo + out.reconstruction.mean()).backward()
        # The kernels give shielded, unsupervised q/k weights exact zeros where eager gives None.
        results.append((out.loss_topo.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                 for n, p in model.named_parameters() if p.requires_grad}))
    (loss_f, grads_f), (loss_m, grads_m) = results
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-5, atol=1e-6)
    for name in grads_m:
        torch.testing.assert_close(grads_f[name], grads_m[name], rtol=1e-3, atol=1e-6, msg=name)


def test_teacher_maps_match_a_direct_computation(model, images):
    maps = model.teacher_maps(images, (4, 4))
    normalized = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    attn = model.dino_teacher(pixel_values=normalized, output_attentions=True).attentions[-1].mean(1)
    patches = attn[:, 3:, 3:]  # CLS + 2 registers
    patches = patches / patches.sum(-1, keepdim=True)
    keys = F.interpolate(patches.reshape(-1, 1, 8, 8), size=(4, 4), mode="bilinear", align_corners=False)
    keys = keys.reshape(2, 64, 16).transpose(1, 2).reshape(-1, 1, 8, 8)
    both = F.interpolate(keys, size=(4, 4), mode="bilinear", align_corners=False).reshape(2, 16, 16).transpose(1, 2)
    expected = both / (both.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    assert not model.dino_teacher.training
    model.train()
    assert not model.dino_teacher.training and model.muse_blocks[0].training


def test_pretrained_components_load_from_local_folders(base_model, tmp_path, images):
    from muse.models.tokenizer import build_autoencoder

    base_model.encoder.save_pretrained(tmp_path / "encoder")
    base_model.dino_teacher.save_pretrained(tmp_path / "teacher")
    # A whole DC-AE is saved, as published checkpoints are; the tokenizer keeps its decoder.
    torch.manual_seed(7)
    autoencoder = build_autoencoder(load_config("tiny").model)
    autoencoder.save_pretrained(tmp_path / "dcae")
    overrides = [f"model.{part}.pretrained={tmp_path / folder}"
                 for part, folder in (("encoder", "encoder"), ("teacher", "teacher"), ("decoder", "dcae"))]
    cfg = load_config("tiny", overrides + [f"model.{part}.random_init=false"
                                           for part in ("encoder", "teacher", "decoder")]).model
    loaded = MuseTokenizer(cfg)
    for name, tensor in base_model.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], tensor), name
    for name, tensor in base_model.dino_teacher.state_dict().items():
        assert torch.equal(loaded.dino_teacher.state_dict()[name], tensor), name
    for name, tensor in autoencoder.decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[name], tensor), name
    # The rest of the model: a full state dict loads strictly, with no key remapping.
    loaded.load_state_dict(base_model.state_dict(), strict=True)
    torch.testing.assert_close(loaded(images).reconstruction, base_model(images).reconstruction)


@pytest.mark.parametrize("make_input,match", [
    (lambda: (torch.rand(2, 3, 6, 32),), "at least 8x8"),
    (lambda: (torch.rand(2, 1, 32, 32),), "3 channels"),
    (lambda: (torch.rand(3, 32, 32),), r"images must be a \(batch, 3, height, width\)"),
    (lambda: (torch.rand(2, 3, 32, 32), torch.randn(2, 8)), r"text_embeds must be \(batch=2, 16\)"),
    (lambda: (torch.rand(2, 3, 32, 32), torch.randn(3, 16)), r"text_embeds must be \(batch=2, 16\)"),
])
def test_bad_input(base_model, make_input, match):
    with pytest.raises(ValueError, match=match):
        base_model(*make_input())


@pytest.mark.parametrize("make_images,error,match", [
    (lambda: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), TypeError, r"floating point.*127\.5 - 1"),
    (lambda: torch.rand(2, 3, 32, 32) * 255, ValueError, r"values in \[-1, 1\].*0\.\.255"),
    (lambda: torch.full((2, 3, 32, 32), float("nan")), ValueError, "NaN"),
])
def test_images_outside_minus_one_one_are_refused_in_every_entry_point(base_model, make_images, error, match):
    for call in (base_model, base_model.encode, base_model.features):
        with pytest.raises(error, match=match):
            call(make_images())


def test_input_check_can_be_switched_off(base_model):
    model = copy.deepcopy(base_model)
    model.cfg = copy.deepcopy(model.cfg)
    model.cfg.check_inputs = False
    assert torch.isfinite(model.encode(torch.rand(1, 3, 32, 32) * 1.5)).all()


def test_whole_config_instead_of_its_model_section_is_named():
    with pytest.raises(TypeError, match=r"MuseTokenizer\(cfg.model\)"):
        MuseTokenizer(load_config("tiny"))
