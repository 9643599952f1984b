"""muse.losses: each term against a direct computation, the weighted total, the discriminator side."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muse.config import LossWeights
from muse.losses import (FeatureDistance, LeCam, MuseLoss, PatchGANDiscriminator, build_backbone,
                         hinge_d_loss, hinge_g_loss, reconstruction_loss)


class TinyBackbone(nn.Module):
    """A stand-in feature extractor (the real ones come from timm/torchvision with local weights)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        f1 = torch.relu(self.c1(x))
        return [f1, torch.relu(self.c2(f1))]


def _images(seed, n=2):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_reconstruction_loss_is_on_unit_range_pixels():
    target = torch.zeros(1, 3, 4, 4)
    assert reconstruction_loss(target + 0.2, target, "l2").item() == pytest.approx(0.01)
    assert reconstruction_loss(target + 0.2, target, "l1").item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="kind must be"):
        reconstruction_loss(target, target, "huber")


def test_lpips_style_distance_matches_the_formula_and_trains_only_the_input():
    torch.manual_seed(0)
    backbone = TinyBackbone()
    dist = FeatureDistance(backbone, mode="lpips")
    x, y = _images(1).requires_grad_(), _images(2)
    value = dist(x, y)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    fx, fy = backbone(((x + 1) / 2 - mean) / std), backbone(((y + 1) / 2 - mean) / std)
    expected = sum(((a / (a.norm(dim=1, keepdim=True) + 1e-10) - b / (b.norm(dim=1, keepdim=True) + 1e-10)) ** 2)
                   .sum(1).mean()
                   for a, b in zip(fx, fy))
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
    assert dist(y, y).item() == pytest.approx(0.0, abs=1e-6)
    value.backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    dist.train()
    assert not dist.backbone.training


def test_l1_feature_distance():
    backbone = TinyBackbone()
    x, y = _images(1), _images(2)
    expected = sum((a - b).abs().mean() for a, b in zip(
        *(backbone(((t + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                   / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)) for t in (x, y))))
    torch.testing.assert_close(FeatureDistance(backbone, mode="l1")(x, y), expected)


def test_build_backbone_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="must start with 'timm:' or 'torchvision:'"):
        build_backbone("vgg16", None)
    with pytest.raises(FileNotFoundError, match="weights file .* does not exist"):
        build_backbone("torchvision:vgg16", str(tmp_path / "missing.pth"), layers=["features.3"])
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="needs torchvision"):
            build_backbone("torchvision:vgg16", None, layers=["features.3"])


# The machines without a GPU cannot install torchvision (and so timm) for the CPU torch; these run
# where they are installed (the GPU machines), on CPU tensors.
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_backbone_loads_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.vgg16(weights=None)
    torch.save(source.state_dict(), tmp_path / "vgg16.pth")
    layers = ["features.3", "features.8", "features.15", "features.22", "features.29"]
    backbone = build_backbone("torchvision:vgg16", str(tmp_path / "vgg16.pth"), layers)
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]
    loaded = dict(backbone.named_parameters())
    assert torch.equal(loaded["extractor.features.0.weight"], source.features[0].weight)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_backbone_loads_a_classification_checkpoint(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "convnext.pth")
    backbone = build_backbone("timm:convnext_atto", str(tmp_path / "convnext.pth"))
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [info["num_chs"] for info in source.feature_info]
    # Every weight of the kept stages came from the file (a silently skipped key would stay random).
    stem = next(v for k, v in backbone.state_dict().items() if k.endswith("weight") and "stem" in k)
    torch.testing.assert_close(stem, source.stem[0].weight)


def test_patchgan_hinge_and_lecam():
    disc = PatchGANDiscriminator(width=8, num_layers=3)
    logits = disc(_images(3, n=4).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2))
    assert logits.shape == (4, 1, 2, 2)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx((0.25 + 0.5) / 2)
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    lecam = LeCam(decay=0.5)
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(1.25) and lecam.ema_fake.item() == pytest.approx(-1.0)
    lecam.update(real + 1, fake)
    assert lecam.ema_real.item() == pytest.approx(1.75)
    expected = F.relu(real - (-1.0)).pow(2).mean() + F.relu(1.75 - fake).pow(2).mean()
    torch.testing.assert_close(lecam(real, fake), expected)


def test_weighted_total_and_terms():
    target = _images(4)
    recon = (target * 0.9).requires_grad_()
    output = SimpleNamespace(reconstruction=recon, loss_topo=torch.tensor(0.3), loss_itc=torch.tensor(0.7),
                             image_embeds=None, logit_scale=None)
    weights = LossWeights(reconstruction=1.0, perceptual=1.1, topology=2.0, itc=0.2, gan=0.5, lecam=0.001)
    disc = PatchGANDiscriminator(width=8, num_layers=2)
    loss = MuseLoss(weights, perceptual=[FeatureDistance(TinyBackbone())], discriminator=disc)
    total, terms = loss(output, target, text_embeds=torch.randn(2, 16))
    assert set(terms) == {"reconstruction", "perceptual", "topology", "itc", "gan", "total"}
    expected = sum(getattr(weights, k) * v for k, v in terms.items() if k != "total")
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert recon.grad.abs().sum() > 0
    d_loss, d_terms = loss.discriminator_loss(recon, target)
    assert set(d_terms) == {"d_hinge", "d_lecam", "d_total"} and bool(loss.lecam.initialized)


def test_missing_pieces_raise():
    with pytest.raises(ValueError, match="needs at least one perceptual"):
        MuseLoss(LossWeights(perceptual=1.0))
    with pytest.raises(ValueError, match="needs a discriminator"):
        MuseLoss(LossWeights(perceptual=0.0, gan=0.5))
    loss = MuseLoss(LossWeights(perceptual=0.0, itc=0.1))
    output = SimpleNamespace(reconstruction=_images(1), loss_topo=torch.tensor(0.1), loss_itc=None)
    with pytest.raises(ValueError, match="needs text_embeds"):
        loss(output, _images(1))
