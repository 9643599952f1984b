"""The official perceptual loss, "lpips-convnext_s-1.0-0.1": (1.0·LPIPS + 0.1·MSE(ConvNeXt-S logits)) / 1.1.

LPIPS is the standard metric network: torchvision's VGG16 features (ImageNet weights) and the
published learned linear heads (``vgg.pth`` v0.1, md5 d507d734…, the file the official code downloads;
it ships inside ``torchmetrics`` and ``lpips``). ConvNeXt-S is torchvision's ``convnext_small``
(IMAGENET1K_V1) read as a classifier: the MSE between the logits of the two images, resized to 224²
with antialiasing and ImageNet-normalized.

Backbones come from torchvision's constructors when torchvision is importable; otherwise from module
trees built here whose state-dict names and shapes are torchvision's, so that torchvision's weight
files (``vgg16-397923af.pth``, ``convnext_small-0c510722.pth``) load into them strictly. Nothing is
downloaded: weights come from local files, and without them the backbones stay random (with a warning).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("muse.models.perceptual")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's VGG16 ("D") feature layout: conv widths, "M" for a 2×2 max pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# torchvision's convnext_small: (width, blocks) per stage.
CONVNEXT_SMALL_STAGES = ((96, 3), (192, 3), (384, 27), (768, 3))

LPIPS_HEADS_MD5 = "d507d7349b931f0638a25a48a722f98a"
# Indices in VGG16's ``features`` after which LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


def _load_weights(path: str | None, what: str) -> dict[str, torch.Tensor] | None:
    if not path:
        log.warning("%s has no weights file: its features are those of a random network", what)
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: weights file {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def _eval_only(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


# ------------------------------------------------------------------------------------------- VGG16

class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` under the same names (``features.N``), without the classifier."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_LAYOUT:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)


def vgg16_classifier_shapes() -> dict[str, tuple[int, ...]]:
    """The classifier entries of a torchvision ``vgg16`` state dict (checked, then dropped: LPIPS needs
    the features only)."""
    shapes = {}
    for index, (fan_in, fan_out) in zip((0, 3, 6), ((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000))):
        shapes[f"classifier.{index}.weight"] = (fan_out, fan_in)
        shapes[f"classifier.{index}.bias"] = (fan_out,)
    return shapes


def build_vgg16_features(weights_path: str | None = None) -> nn.Sequential:
    """VGG16's feature layers with a torchvision ``vgg16`` state dict from ``weights_path`` (strict)."""
    state = _load_weights(weights_path, "VGG16 (LPIPS backbone)")
    torchvision = _torchvision()
    if torchvision is not None:
        model = torchvision.models.vgg16(weights=None)
        if state is not None:
            model.load_state_dict(state)
        return _eval_only(model.features)
    model = VGG16Features()
    if state is not None:
        expected = vgg16_classifier_shapes()
        classifier = {k: v for k, v in state.items() if k.startswith("classifier.")}
        wrong = {k: tuple(v.shape) for k, v in classifier.items() if expected.get(k) != tuple(v.shape)}
        missing = sorted(set(expected) - set(classifier))
        if wrong or missing:
            raise ValueError(f"{weights_path}: not a torchvision vgg16 state dict (classifier: missing {missing}, "
                             f"unexpected or misshaped {wrong})")
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    return _eval_only(model.features)


# ---------------------------------------------------------------------------------------- ConvNeXt

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (torchvision's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ChannelsLast(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class ConvNeXtBlock(nn.Module):
    """torchvision's ``CNBlock`` in evaluation mode (its stochastic depth is the identity there):
    x + layer_scale · (depthwise 7×7 → LayerNorm → Linear 4× → GELU → Linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            _ChannelsLast((0, 2, 3, 1)),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _ChannelsLast((0, 3, 1, 2)),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXtSmall(nn.Module):
    """torchvision's ``convnext_small`` (names ``features``, ``classifier``), returning ImageNet logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        first = CONVNEXT_SMALL_STAGES[0][0]
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, first, kernel_size=4, stride=4),
                                                 LayerNorm2d(first, eps=1e-6))]
        for index, (width, blocks) in enumerate(CONVNEXT_SMALL_STAGES):
            layers.append(nn.Sequential(*(ConvNeXtBlock(width) for _ in range(blocks))))
            if index + 1 < len(CONVNEXT_SMALL_STAGES):
                following = CONVNEXT_SMALL_STAGES[index + 1][0]
                layers.append(nn.Sequential(LayerNorm2d(width, eps=1e-6),
                                            nn.Conv2d(width, following, kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = CONVNEXT_SMALL_STAGES[-1][0]
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=1e-6), nn.Flatten(1), nn.Linear(last, num_classes))
        # torchvision's init, trunc_normal_(std=0.02) cut at ±2 (i.e. ±100 std: never), drawn as the
        # plain normal it equals in distribution, which is ten times faster on CPU.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def build_convnext_small(weights_path: str | None = None) -> nn.Module:
    """ConvNeXt-S classifier with a torchvision ``convnext_small`` state dict from ``weights_path`` (strict)."""
    state = _load_weights(weights_path, "ConvNeXt-S (perceptual classifier)")
    torchvision = _torchvision()
    model = torchvision.models.convnext_small(weights=None) if torchvision is not None else ConvNeXtSmall()
    if state is not None:
        model.load_state_dict(state)
    return _eval_only(model)


# ------------------------------------------------------------------------------------------- LPIPS

def packaged_lpips_heads() -> Path | None:
    """The LPIPS v0.1 VGG heads shipped inside an installed ``torchmetrics`` or ``lpips``, if any."""
    for package, relative in (("torchmetrics", "functional/image/lpips_models/vgg.pth"),
                              ("lpips", "weights/v0.1/vgg.pth")):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root) / relative
            if path.is_file():
                return path
    return None


class _LinearHead(nn.Module):
    """One LPIPS head under the published file's names (``model.0`` dropout, ``model.1`` the 1×1 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    """LPIPS with the VGG16 backbone, as the official ``muse/models/lpips.py``: inputs in [0, 1] are
    mapped to [-1, 1], shifted and scaled, each tap's features unit-normalized over channels
    (x / (‖x‖ + 1e-10)), squared differences weighted by the learned heads, averaged over space and
    summed over the five taps. Returns (B, 1, 1, 1)."""

    def __init__(self, vgg_features: nn.Sequential, heads_path: str | None = None):
        super().__init__()
        self.net = _eval_only(vgg_features)
        for index, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{index}", _LinearHead(channels))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load_heads(heads_path)
        _eval_only(self)

    def _load_heads(self, heads_path: str | None) -> None:
        path = Path(heads_path) if heads_path else packaged_lpips_heads()
        if path is None:
            raise FileNotFoundError("LPIPS needs its published linear heads (vgg.pth v0.1): install torchmetrics "
                                    "or lpips (both ship the file), or set loss.lpips_heads to a local copy")
        if not path.is_file():
            raise FileNotFoundError(f"loss.lpips_heads: {str(path)!r} does not exist")
        with open(path, "rb") as f:
            digest = hashlib.md5(f.read()).hexdigest()
        if digest != LPIPS_HEADS_MD5:
            log.warning("LPIPS heads %s have md5 %s, not the published v0.1 VGG heads' %s", path, digest,
                        LPIPS_HEADS_MD5)
        heads = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
                 if k.startswith("lin")}
        expected = {k for k in self.state_dict() if k.startswith("lin")}
        if set(heads) != expected:
            raise ValueError(f"{path}: LPIPS heads must be {sorted(expected)}, got {sorted(heads)}")
        self.load_state_dict(heads, strict=False)
        self.heads_path = str(path)

    def train(self, mode: bool = True):
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.net[:LPIPS_TAPS[-1] + 1]):
            x = layer(x)
            if index in LPIPS_TAPS:
                taps.append(x)
        return taps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats_in = self._taps(((input * 2 - 1) - self.shift) / self.scale)
        feats_target = self._taps(((target * 2 - 1) - self.shift) / self.scale)
        total = 0.0
        for index, (a, b) in enumerate(zip(feats_in, feats_target)):
            diff = (_unit(a) - _unit(b)) ** 2
            total = total + getattr(self, f"lin{index}").model(diff).mean((2, 3), keepdim=True)
        return total


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


# -------------------------------------------------------------------------------------- perceptual

class PerceptualLoss(nn.Module):
    """(w_lpips · mean LPIPS + w_convnext · MSE(ConvNeXt-S logits)) / (w_lpips + w_convnext), inputs in [0, 1].

    A network whose weight is 0 is not built. ``convnext_resolution``: the size both images are
    resized to (bilinear, antialiased) before ConvNeXt-S; the official 224."""

    def __init__(self, lpips: LPIPS | None, convnext: nn.Module | None, lpips_weight: float = 1.0,
                 convnext_weight: float = 0.1, convnext_resolution: int = 224):
        super().__init__()
        if lpips_weight < 0 or convnext_weight < 0 or lpips_weight + convnext_weight <= 0:
            raise ValueError(f"perceptual weights must be >= 0 with a positive sum, got lpips_weight={lpips_weight}, "
                             f"convnext_weight={convnext_weight}")
        for name, net, weight in (("lpips", lpips, lpips_weight), ("convnext", convnext, convnext_weight)):
            if weight > 0 and net is None:
                raise ValueError(f"{name}_weight={weight} needs the {name} network")
        self.lpips = lpips if lpips_weight > 0 else None
        self.convnext = _eval_only(convnext) if convnext_weight > 0 else None
        self.lpips_weight, self.convnext_weight = lpips_weight, convnext_weight
        self.convnext_resolution = convnext_resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        size = self.convnext_resolution
        resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.convnext((resized - self.mean) / self.std)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = input.new_zeros(())
        if self.lpips is not None:
            total = total + self.lpips_weight * self.lpips(input, target).mean()
        if self.convnext is not None:
            with torch.no_grad():
                target_logits = self._logits(target)
            total = total + self.convnext_weight * F.mse_loss(self._logits(input), target_logits)
        return total / (self.lpips_weight + self.convnext_weight)


def build_perceptual_loss(vgg16_weights: str | None = None, convnext_weights: str | None = None,
                          lpips_heads: str | None = None, lpips_weight: float = 1.0, convnext_weight: float = 0.1,
                          convnext_resolution: int = 224) -> PerceptualLoss:
    lpips = LPIPS(build_vgg16_features(vgg16_weights), lpips_heads) if lpips_weight > 0 else None
    convnext = build_convnext_small(convnext_weights) if convnext_weight > 0 else None
    return PerceptualLoss(lpips, convnext, lpips_weight, convnext_weight, convnext_resolution)
