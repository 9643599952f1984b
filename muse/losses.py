"""MUSE's training losses as the official ``muse/losses/muse_loss.py``: reconstruction, perceptual
(LPIPS + ConvNeXt-S logits), adversarial (hinge, LeCam on batch-mean logits), topology, ITC, and one
module that weights them and reports every term.

Images enter in [-1, 1] (ours; the official loader hands ImageNet-normalized images and maps them
back). Both the target and the raw decoder output are mapped to [0, 1] and clamped there before any
term, so pixels the decoder pushes out of range get no gradient, as officially. The terms are computed
in fp32 with autocast off, as the official loss module is.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import LossWeights
from muse.models.discriminator import OFFICIAL_LECAM_KEYS
from muse.models.tokenizer import itc_loss


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped: what every official loss term sees."""
    return ((images.float() + 1) / 2).clamp(0.0, 1.0)


def _pixel_distance(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    diff = reconstruction - target
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """L1 or L2 between [-1, 1] images, taken on their clamped [0, 1] pixels."""
    return _pixel_distance(to_unit_range(reconstruction), to_unit_range(target), kind)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()) / 2


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class LeCam(nn.Module):
    """LeCam regularization on batch-mean logits, as official: with r, f the batch means of the
    discriminator's logits on real and reconstructed images, relu(r − ema_fake)² + relu(ema_real − f)².
    The EMAs (buffers under the official names, checkpointed) start at 0 and follow
    ema ← decay·ema + (1 − decay)·mean after each discriminator step."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"lecam decay must be in [0, 1), got {decay}")
        self.decay = decay
        for name in OFFICIAL_LECAM_KEYS:
            self.register_buffer(name, torch.zeros(1))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real, fake = logits_real.float().mean(), logits_fake.float().mean()
        return (F.relu(real - self.ema_fake_logits_mean).pow(2).mean()
                + F.relu(self.ema_real_logits_mean - fake).pow(2).mean())

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        self.ema_real_logits_mean.mul_(self.decay).add_((1 - self.decay) * logits_real.float().mean())
        self.ema_fake_logits_mean.mul_(self.decay).add_((1 - self.decay) * logits_fake.float().mean())


def _fp32(device: torch.device):
    # The official loss module runs with autocast disabled: every term in fp32.
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class MuseLoss(nn.Module):
    """Weighted generator-side total plus every term (detached tensors) for logging.

    ``perceptual``: a ``muse.models.perceptual.PerceptualLoss`` on [0, 1] images (needed when
    ``weights.perceptual > 0``). ``discriminator``: the official ``NLayerDiscriminator`` (needed for
    ``gan``/``lecam``). ``disc_factor`` scales both the generator's GAN term and the discriminator's
    loss (the official ``discriminator_factor``). The discriminator's own loss is ``discriminator_loss``.
    """

    def __init__(self, weights: LossWeights, perceptual: nn.Module | None = None,
                 discriminator: nn.Module | None = None, reconstruction_kind: str = "l2", lecam_decay: float = 0.999,
                 disc_factor: float = 1.0):
        super().__init__()
        self.weights = weights
        self.perceptual = perceptual
        self.discriminator = discriminator
        self.lecam = LeCam(lecam_decay)
        self.reconstruction_kind = reconstruction_kind
        self.disc_factor = disc_factor
        if weights.perceptual and not isinstance(perceptual, nn.Module):
            raise ValueError("weights.perceptual > 0 needs a perceptual loss module")
        if (weights.gan or weights.lecam) and discriminator is None:
            raise ValueError("weights.gan or weights.lecam > 0 needs a discriminator")

    def forward(self, output, images: torch.Tensor, text_embeds: torch.Tensor | None = None,
                adversarial: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``adversarial=False`` leaves the GAN term out (before ``loss.disc_start``)."""
        w = self.weights
        with _fp32(images.device):
            reconstruction, target = to_unit_range(output.reconstruction), to_unit_range(images)
            terms: dict[str, torch.Tensor] = {
                "reconstruction": _pixel_distance(reconstruction, target, self.reconstruction_kind)}
            if w.perceptual:
                terms["perceptual"] = self.perceptual(reconstruction, target)
            if w.gan and adversarial and self.disc_factor:
                # As officially, the generator's pass leaves the discriminator's weights without gradients.
                self.discriminator.requires_grad_(False)
                try:
                    terms["gan"] = self.disc_factor * hinge_g_loss(self.discriminator(reconstruction))
                finally:
                    self.discriminator.requires_grad_(True)
        if w.topology:
            if output.loss_topo is None:
                raise ValueError("weights.topology > 0 but the model returned no topology loss")
            terms["topology"] = output.loss_topo
        if w.itc:
            if text_embeds is None:
                raise ValueError("weights.itc > 0 needs text_embeds")
            terms["itc"] = output.loss_itc if output.loss_itc is not None else itc_loss(
                output.image_embeds, text_embeds, output.logit_scale)
        total = sum(getattr(w, name) * value for name, value in terms.items())
        # Detached tensors, not floats: the caller decides when to synchronize for logging.
        return total, {name: value.detach() for name, value in terms.items()} | {"total": total.detach()}

    def discriminator_loss(self, reconstruction: torch.Tensor, images: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor · (hinge + lecam_weight · LeCam), LeCam against the EMAs before this step's update."""
        with _fp32(images.device):
            logits_real = self.discriminator(to_unit_range(images))
            logits_fake = self.discriminator(to_unit_range(reconstruction.detach()))
            loss = hinge_d_loss(logits_real, logits_fake)
            terms = {"d_hinge": loss.detach(), "d_logits_real": logits_real.detach().mean(),
                     "d_logits_fake": logits_fake.detach().mean()}
            if self.weights.lecam:
                reg = self.lecam(logits_real, logits_fake)
                loss = loss + self.weights.lecam * reg
                terms["d_lecam"] = reg.detach()
                self.lecam.update(logits_real, logits_fake)
            loss = self.disc_factor * loss
        return loss, terms | {"d_total": loss.detach()}
