"""MUSE's training losses: reconstruction, perceptual, adversarial (PatchGAN, hinge, LeCam), topology,
ITC, and one module that weights them and reports every term.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import LossWeights
from muse.models.tokenizer import itc_loss

log = logging.getLogger("muse.losses")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1]: losses are taken on de-normalized pixels."""
    return (images + 1) / 2


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    diff = to_unit_range(reconstruction.float()) - to_unit_range(target.float())
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


# ---------------------------------------------------------------------------------------- perceptual

class FeatureDistance(nn.Module):
    """Distance between the feature maps of a frozen backbone (a module returning a list of maps).

    ``lpips`` (the LPIPS recipe): unit-normalize every feature vector over channels, squared
    difference, mean over space, optional per-channel weights (ones by default), summed over layers.
    ``l1``: mean absolute difference of the raw features, summed over layers (the ConvNeXt loss).
    Inputs are [-1, 1] images, fed to the backbone ImageNet-normalized.
    """

    def __init__(self, backbone: nn.Module, mode: str = "lpips", channel_weights: list[torch.Tensor] | None = None):
        super().__init__()
        if mode not in ("lpips", "l1"):
            raise ValueError(f"mode must be 'lpips' or 'l1', got {mode!r}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.mode = mode
        self.channel_weights = nn.ParameterList(
            [nn.Parameter(w.detach().clone(), requires_grad=False) for w in channel_weights or []])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone((to_unit_range(images) - self.mean) / self.std)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats_x = self._features(reconstruction)
        with torch.no_grad():
            feats_y = self._features(target)
        total = reconstruction.new_zeros((), dtype=torch.float32)
        for index, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            fx, fy = fx.float(), fy.float()
            if self.mode == "l1":
                total = total + (fx - fy).abs().mean()
                continue
            diff = (_unit(fx) - _unit(fy)).pow(2)
            if index < len(self.channel_weights):
                diff = diff * self.channel_weights[index].view(1, -1, 1, 1)
            total = total + diff.sum(1).mean()
        return total


def _unit(features: torch.Tensor) -> torch.Tensor:
    """LPIPS's channel normalization: x / (‖x‖ + 1e-10), zero where a ReLU zeroed every channel."""
    return features / (features.norm(dim=1, keepdim=True) + 1e-10)


def build_backbone(name: str, weights_path: str | None, layers: list[str] | None = None) -> nn.Module:
    """A feature backbone from its library's constructor, weights from a local file (nothing is downloaded).

    ``torchvision:<model>`` (e.g. ``torchvision:vgg16``, LPIPS's backbone) or ``timm:<model>``
    (e.g. ``timm:convnext_small``), returning the maps after ``layers`` (timm: its feature stages).
    """
    library, _, model_name = name.partition(":")
    if library not in ("timm", "torchvision"):
        raise ValueError(f"backbone name must start with 'timm:' or 'torchvision:', got {name!r}")
    if weights_path and not Path(weights_path).is_file():
        raise FileNotFoundError(f"{name}: weights file {weights_path!r} does not exist")
    if not weights_path:
        log.warning("%s has no weights file: its features are those of a random network", name)
    if library == "timm":
        try:
            import timm
        except ImportError as err:
            raise ImportError(f"{name} needs timm (and torchvision): {err}") from None
        # timm loads the file into the whole classifier (its own key filter, strict) before it keeps
        # the feature stages: a classification checkpoint's keys do not match the feature wrapper's.
        return timm.create_model(model_name, pretrained=bool(weights_path), features_only=True,
                                 pretrained_cfg_overlay={"file": weights_path} if weights_path else None)
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(f"{name} needs torchvision: {err}") from None
    from torchvision.models.feature_extraction import create_feature_extractor

    if not layers:
        raise ValueError(f"{name}: pass the layer names whose outputs are the features")
    base = torchvision.models.get_model(model_name, weights=None)
    if weights_path:
        base.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return _DictToList(create_feature_extractor(base, return_nodes=layers))


class _DictToList(nn.Module):
    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.extractor(x).values())


# -------------------------------------------------------------------------------------- adversarial

class PatchGANDiscriminator(nn.Module):
    """The NLayer PatchGAN discriminator: 4×4 convolutions, stride 2, channel width doubling up to 8×,
    BatchNorm and LeakyReLU(0.2); one logit per image patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = width
        for index in range(1, num_layers + 1):
            out = width * min(2 ** index, 8)
            stride = 2 if index < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()) / 2


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class LeCam(nn.Module):
    """LeCam regularization: discriminator outputs are pulled toward EMAs of the other side's mean,
    relu(D(real) − ema_fake)² + relu(ema_real − D(fake))². The EMAs are buffers (checkpointed)."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        real, fake = logits_real.float().mean(), logits_fake.float().mean()
        if not bool(self.initialized):
            self.ema_real.copy_(real)
            self.ema_fake.copy_(fake)
            self.initialized.fill_(True)
        else:
            self.ema_real.lerp_(real, 1 - self.decay)
            self.ema_fake.lerp_(fake, 1 - self.decay)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake.float()).pow(2).mean())


# --------------------------------------------------------------------------------------------- total

class MuseLoss(nn.Module):
    """Weighted generator-side total plus every term (detached tensors) for logging.

    ``perceptual``: a list of ``FeatureDistance`` modules (LPIPS-style and ConvNeXt) summed; terms
    with weight 0 are not computed. The discriminator's own loss is ``discriminator_loss``.
    """

    def __init__(self, weights: LossWeights, perceptual: list[FeatureDistance] | None = None,
                 discriminator: nn.Module | None = None, reconstruction_kind: str = "l2", lecam_decay: float = 0.999):
        super().__init__()
        self.weights = weights
        self.perceptual = nn.ModuleList(perceptual or [])
        self.discriminator = discriminator
        self.lecam = LeCam(lecam_decay)
        self.reconstruction_kind = reconstruction_kind
        if weights.perceptual and not self.perceptual:
            raise ValueError("weights.perceptual > 0 needs at least one perceptual FeatureDistance")
        if (weights.gan or weights.lecam) and discriminator is None:
            raise ValueError("weights.gan or weights.lecam > 0 needs a discriminator")

    def forward(self, output, images: torch.Tensor, text_embeds: torch.Tensor | None = None,
                adversarial: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``adversarial=False`` leaves the GAN term out (before the discriminator starts)."""
        w = self.weights
        terms: dict[str, torch.Tensor] = {"reconstruction": reconstruction_loss(output.reconstruction, images,
                                                                                  self.reconstruction_kind)}
        if w.perceptual:
            terms["perceptual"] = sum(p(output.reconstruction, images) for p in self.perceptual)
        if w.topology:
            if output.loss_topo is None:
                raise ValueError("weights.topology > 0 but the model returned no topology loss")
            terms["topology"] = output.loss_topo
        if w.itc:
            if text_embeds is None:
                raise ValueError("weights.itc > 0 needs text_embeds")
            terms["itc"] = output.loss_itc if output.loss_itc is not None else itc_loss(
                output.image_embeds, text_embeds, output.logit_scale)
        if w.gan and adversarial:
            terms["gan"] = hinge_g_loss(self.discriminator(output.reconstruction))
        total = sum(getattr(w, name) * value for name, value in terms.items())
        # Detached tensors, not floats: the caller decides when to synchronize for logging.
        return total, {name: value.detach() for name, value in terms.items()} | {"total": total.detach()}

    def discriminator_loss(self, reconstruction: torch.Tensor, images: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(images)
        logits_fake = self.discriminator(reconstruction.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        terms = {"d_hinge": loss.detach()}
        if self.weights.lecam:
            reg = self.lecam(logits_real, logits_fake)
            loss = loss + self.weights.lecam * reg
            terms["d_lecam"] = reg.detach()
        self.lecam.update(logits_real, logits_fake)
        return loss, terms | {"d_total": loss.detach()}
