"""muse.models.perceptual: torchvision's VGG16 and ConvNeXt-S state dicts load strictly into our module
trees (key lists built here from torchvision's documented architectures), their forwards match
independent functional computations, LPIPS matches torchmetrics' LPIPS with the same weights, and the
official combination (1.0·LPIPS + 0.1·MSE(logits)) / 1.1."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muse.models import perceptual as P
from muse.models.perceptual import (LPIPS, ConvNeXtSmall, PerceptualLoss, VGG16Features, build_convnext_small,
                                    build_vgg16_features, packaged_lpips_heads)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# torchvision's vgg16 (configuration "D"): 3×3 convs (padding 1) each followed by a ReLU, "M" a 2×2
# max pool; classifier Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, 1000).
VGG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# torchvision's convnext_small: stem Conv 4×4/4 + LayerNorm2d; stages (width, depth); a LayerNorm2d +
# Conv 2×2/2 between stages; classifier LayerNorm2d, Flatten, Linear(768, 1000). Documented params: 50,223,688.
CONVNEXT_S = [(96, 3), (192, 3), (384, 27), (768, 3)]


def torchvision_vgg16_shapes() -> dict[str, tuple]:
    shapes, index, channels = {}, 0, 3
    for item in VGG_D:
        if item == "M":
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (item, channels, 3, 3)
        shapes[f"features.{index}.bias"] = (item,)
        channels, index = item, index + 2
    for index, (fan_out, fan_in) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        shapes[f"classifier.{index}.weight"], shapes[f"classifier.{index}.bias"] = (fan_out, fan_in), (fan_out,)
    return shapes


def torchvision_convnext_small_shapes() -> dict[str, tuple]:
    shapes = {"features.0.0.weight": (96, 3, 4, 4), "features.0.0.bias": (96,),
              "features.0.1.weight": (96,), "features.0.1.bias": (96,)}
    for stage, (width, depth) in enumerate(CONVNEXT_S):
        prefix = f"features.{1 + 2 * stage}"
        for block in range(depth):
            b = f"{prefix}.{block}"
            shapes |= {f"{b}.layer_scale": (width, 1, 1), f"{b}.block.0.weight": (width, 1, 7, 7),
                       f"{b}.block.0.bias": (width,), f"{b}.block.2.weight": (width,), f"{b}.block.2.bias": (width,),
                       f"{b}.block.3.weight": (4 * width, width), f"{b}.block.3.bias": (4 * width,),
                       f"{b}.block.5.weight": (width, 4 * width), f"{b}.block.5.bias": (width,)}
        if stage + 1 < len(CONVNEXT_S):
            d, following = f"features.{2 + 2 * stage}", CONVNEXT_S[stage + 1][0]
            shapes |= {f"{d}.0.weight": (width,), f"{d}.0.bias": (width,),
                       f"{d}.1.weight": (following, width, 2, 2), f"{d}.1.bias": (following,)}
    shapes |= {"classifier.0.weight": (768,), "classifier.0.bias": (768,), "classifier.2.weight": (1000, 768),
               "classifier.2.bias": (1000,)}
    return shapes


def _constant_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A distinct value per tensor, stored as one expanded element: a full-size state dict in a tiny file."""
    return {k: torch.tensor(float(i + 1)).expand(shape) for i, (k, shape) in enumerate(shapes.items())}


@pytest.fixture(scope="module")
def vgg_state():
    torch.manual_seed(0)
    return VGG16Features().state_dict()


def test_vgg16_tree_has_torchvisions_names_and_a_written_state_dict_loads_strictly(tmp_path):
    expected = torchvision_vgg16_shapes()
    ours = {k: tuple(v.shape) for k, v in VGG16Features().state_dict().items()}
    assert ours == {k: v for k, v in expected.items() if k.startswith("features.")}
    state = _constant_state(expected)
    torch.save(state, tmp_path / "vgg16.pth")
    features = build_vgg16_features(str(tmp_path / "vgg16.pth"))
    for key, value in features.state_dict().items():
        assert torch.equal(value, state[f"features.{key}"]), key
    assert not any(p.requires_grad for p in features.parameters()) and not features.training
    # A feature-only or misnamed file is refused instead of half-loaded.
    torch.save({k: v for k, v in state.items() if k != "classifier.6.bias"}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16 state dict"):
        build_vgg16_features(str(tmp_path / "partial.pth"))
    torch.save(state | {"features.0.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "misshaped.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_vgg16_features(str(tmp_path / "misshaped.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_vgg16_features(str(tmp_path / "missing.pth"))


def _functional_vgg_taps(state, x):
    """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 from the state dict, by hand."""
    taps, index = [], 0
    for block in ([64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]):
        if taps:
            x = F.max_pool2d(x, 2)
            index += 1
        for _ in block:
            x = F.relu(F.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
            index += 2
        taps.append(x)
    return taps


def test_lpips_taps_equal_a_functional_vgg(vgg_state):
    lpips = LPIPS(VGG16Features().requires_grad_(False).features)
    lpips.net.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items()})
    x = torch.rand(1, 3, 32, 32)
    for ours, reference in zip(lpips._taps(x), _functional_vgg_taps(vgg_state, x)):
        torch.testing.assert_close(ours, reference)


def test_lpips_heads_come_from_the_published_file():
    path = packaged_lpips_heads()
    assert path is not None, "torchmetrics (a muse extra) ships the LPIPS heads"
    import hashlib

    assert hashlib.md5(path.read_bytes()).hexdigest() == P.LPIPS_HEADS_MD5
    lpips = LPIPS(VGG16Features().features)
    published = torch.load(path, map_location="cpu", weights_only=True)
    for index, channels in enumerate((64, 128, 256, 512, 512)):
        head = getattr(lpips, f"lin{index}").model[1].weight
        assert head.shape == (1, channels, 1, 1) and torch.equal(head, published[f"lin{index}.model.1.weight"])


def test_lpips_heads_errors(tmp_path, monkeypatch):
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="LPIPS heads must be"):
        LPIPS(VGG16Features().features, str(tmp_path / "short.pth"))
    with pytest.raises(FileNotFoundError, match="loss.lpips_heads"):
        LPIPS(VGG16Features().features, str(tmp_path / "none.pth"))
    monkeypatch.setattr(P, "packaged_lpips_heads", lambda: None)
    with pytest.raises(FileNotFoundError, match="install torchmetrics or lpips"):
        LPIPS(VGG16Features().features)


def _torchmetrics_lpips(vgg_state, monkeypatch):
    """torchmetrics' own LPIPS (its code, its packaged heads) on the same VGG16 weights. Its backbone
    comes from torchvision; without torchvision it is handed our tree with the same weights."""
    from torchmetrics.functional.image import lpips as tm_lpips

    def features(net, pretrained=False):
        assert net == "vgg16"
        if HAS_TORCHVISION:
            import torchvision

            model = torchvision.models.vgg16(weights=None)
            classifier = {k: torch.zeros(()).expand(v) for k, v in torchvision_vgg16_shapes().items()
                          if k.startswith("classifier.")}
            model.load_state_dict(vgg_state | classifier)
            return model.features
        tree = VGG16Features()
        tree.load_state_dict(vgg_state)
        return tree.features

    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", features)
    return tm_lpips._NoTrainLpips(net="vgg")


def test_lpips_equals_torchmetrics_with_the_same_weights(vgg_state, monkeypatch):
    reference = _torchmetrics_lpips(vgg_state, monkeypatch)
    ours = LPIPS(VGG16Features().features)
    ours.net.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items()})
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    value = ours(x, y)
    assert value.shape == (2, 1, 1, 1) and (value > 0).all()
    # torchmetrics normalizes with sqrt(1e-8 + Σx²), the official code with sqrt(Σx²) + 1e-10.
    torch.testing.assert_close(value.flatten(), reference(x, y, normalize=True).flatten(), rtol=1e-5, atol=1e-7)
    assert ours(x, x).abs().max().item() == 0.0


def _functional_convnext(state, x):
    """ConvNeXt-S logits from the state dict, by hand (torchvision's CNBlock in eval mode)."""
    def ln2d(t, key):
        return F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], state[f"{key}.weight"], state[f"{key}.bias"],
                            1e-6).permute(0, 3, 1, 2)

    x = ln2d(F.conv2d(x, state["features.0.0.weight"], state["features.0.0.bias"], stride=4), "features.0.1")
    for stage, (width, depth) in enumerate(CONVNEXT_S):
        for block in range(depth):
            b = f"features.{1 + 2 * stage}.{block}"
            h = F.conv2d(x, state[f"{b}.block.0.weight"], state[f"{b}.block.0.bias"], padding=3, groups=width)
            h = F.layer_norm(h.permute(0, 2, 3, 1), (width,), state[f"{b}.block.2.weight"], state[f"{b}.block.2.bias"],
                             1e-6)
            h = F.linear(F.gelu(F.linear(h, state[f"{b}.block.3.weight"], state[f"{b}.block.3.bias"])),
                         state[f"{b}.block.5.weight"], state[f"{b}.block.5.bias"])
            x = x + state[f"{b}.layer_scale"] * h.permute(0, 3, 1, 2)
        if stage + 1 < len(CONVNEXT_S):
            d = f"features.{2 + 2 * stage}"
            x = F.conv2d(ln2d(x, f"{d}.0"), state[f"{d}.1.weight"], state[f"{d}.1.bias"], stride=2)
    x = ln2d(x.mean((2, 3), keepdim=True), "classifier.0").flatten(1)
    return F.linear(x, state["classifier.2.weight"], state["classifier.2.bias"])


def test_convnext_small_tree_loads_torchvisions_names_strictly_and_computes_its_logits(tmp_path):
    expected = torchvision_convnext_small_shapes()
    torch.manual_seed(0)
    model = ConvNeXtSmall()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 50_223_688  # torchvision's documented count
    # Layer scales of 1e-6 (the init) would hide the blocks: give them weight before comparing.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.uniform_(0.2, 0.6)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), _functional_convnext(model.state_dict(), x), rtol=1e-4, atol=1e-5)
    state = _constant_state(expected)
    torch.save(state, tmp_path / "convnext_small.pth")
    loaded = build_convnext_small(str(tmp_path / "convnext_small.pth"))
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    del state["classifier.2.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        build_convnext_small(str(tmp_path / "partial.pth"))


class _Classifier(nn.Module):
    """A small stand-in for ConvNeXt-S that records its input size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=4)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x).mean((2, 3))


def test_perceptual_loss_is_the_official_weighted_combination(vgg_state):
    torch.manual_seed(0)
    lpips, classifier = LPIPS(VGG16Features().features), _Classifier()
    loss = PerceptualLoss(lpips, classifier, lpips_weight=1.0, convnext_weight=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=gen).requires_grad_()
    y = torch.rand(1, 3, 32, 32, generator=gen)
    value = loss(x, y)
    mean, std = torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(P.IMAGENET_STD).view(1, 3, 1, 1)

    def logits(t):
        return classifier((F.interpolate(t, size=224, mode="bilinear", align_corners=False, antialias=True)
                           - mean) / std)

    expected = (1.0 * lpips(x, y).mean() + 0.1 * F.mse_loss(logits(x), logits(y))) / 1.1
    torch.testing.assert_close(value, expected)
    assert classifier.sizes[0] == (224, 224)
    value.backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in classifier.parameters())
    loss.train()
    assert not loss.training and not lpips.training
    assert loss(y, y).item() == 0.0
    lpips_only = PerceptualLoss(lpips, None, 1.0, 0.0)
    torch.testing.assert_close(lpips_only(x, y), lpips(x, y).mean())
    with pytest.raises(ValueError, match="convnext_weight=0.1 needs the convnext network"):
        PerceptualLoss(lpips, None, 1.0, 0.1)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (CPU machines cannot install it)")
def test_torchvision_models_and_ours_agree():
    import torchvision

    torch.manual_seed(0)
    tv_vgg, tv_convnext = torchvision.models.vgg16(weights=None).eval(), torchvision.models.convnext_small().eval()
    vgg, convnext = VGG16Features(), ConvNeXtSmall().eval()
    vgg.features.load_state_dict(tv_vgg.features.state_dict())
    convnext.load_state_dict(tv_convnext.state_dict())
    assert set(tv_vgg.state_dict()) == set(torchvision_vgg16_shapes())
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(vgg.features(x), tv_vgg.features(x))
    torch.testing.assert_close(convnext(x), tv_convnext(x))
