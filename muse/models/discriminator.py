"""The official stage-3 discriminator: a blur-resampled PatchGAN with GroupNorm (``NLayerDiscriminator`` of
the official ``muse/models/discriminator.py``), on images in [0, 1].

Conv 5×5 → LeakyReLU(0.1) → ``stages`` × [Conv 3×3 (width doubling from the second stage), blur
downsampling (1, 3, 3, 1) at stride 2, GroupNorm(32), LeakyReLU(0.1)] → adaptive max pool to 16×16 →
Conv 1×1 → LeakyReLU(0.1) → Conv 5×5 to one logit per cell. About 1.9 M parameters; names as official,
so a discriminator from an official stage-3 run loads (``load_official_discriminator``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("muse.models.discriminator")

BLUR_TAPS = {3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}
# The official blur pads every input as a 4-tap filter would need, whatever its taps.
_BLUR_PAD_TAPS = 4


def _same_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    # "Same" padding at stride 1 with an odd kernel is symmetric: (k − 1) / 2 on every side.
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class BlurDownsample(nn.Module):
    """Anti-aliased 2× downsampling: a normalized separable binomial filter, depthwise, stride 2, with
    TensorFlow-style "same" padding (the extra pixel, for odd sizes, at the bottom/right)."""

    def __init__(self, kernel_size: int = 4):
        super().__init__()
        if kernel_size not in BLUR_TAPS:
            raise ValueError(f"blur kernel_size must be one of {sorted(BLUR_TAPS)}, got {kernel_size}")
        taps = torch.tensor(BLUR_TAPS[kernel_size])
        kernel = taps[None, :] * taps[:, None]
        # Persistent, as in the official module: its checkpoints hold it.
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = x.shape[-3:]
        pad_h = max((math.ceil(height / 2) - 1) * 2 + _BLUR_PAD_TAPS - height, 0)
        pad_w = max((math.ceil(width / 2) - 1) * 2 + _BLUR_PAD_TAPS - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.kernel.to(x.dtype).expand(channels, -1, -1, -1), stride=2, groups=channels)


class NLayerDiscriminator(nn.Module):
    """The official discriminator. Returns (B, 1, pool_size, pool_size) logits for any input size."""

    def __init__(self, in_channels: int = 3, hidden_channels: int = 128, stages: int = 3, blur: bool = True,
                 blur_kernel_size: int = 4, pool_size: int = 16, negative_slope: float = 0.1):
        super().__init__()
        if stages < 1:
            raise ValueError(f"discriminator stages must be >= 1, got {stages}")
        if hidden_channels % 32:
            raise ValueError(f"discriminator hidden_channels must be a multiple of 32 (GroupNorm(32)), "
                             f"got {hidden_channels}")
        self.block_in = nn.Sequential(_same_conv(in_channels, hidden_channels, 5), nn.LeakyReLU(negative_slope))
        multipliers = (1, *(2 ** i for i in range(stages)))
        blocks = []
        for index in range(stages):
            cin, cout = hidden_channels * multipliers[index], hidden_channels * multipliers[index + 1]
            blocks.append(nn.Sequential(
                _same_conv(cin, cout, 3),
                BlurDownsample(blur_kernel_size) if blur else nn.AvgPool2d(kernel_size=2, stride=2),
                nn.GroupNorm(32, cout),
                nn.LeakyReLU(negative_slope),
            ))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d((pool_size, pool_size))
        self.to_logits = nn.Sequential(_same_conv(cout, cout, 1), nn.LeakyReLU(negative_slope),
                                       _same_conv(cout, 1, 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.block_in(images)
        for block in self.blocks:
            hidden = block(hidden)
        return self.to_logits(self.pool(hidden))


OFFICIAL_LECAM_KEYS = ("ema_real_logits_mean", "ema_fake_logits_mean")


def load_official_discriminator(path: str | Path, discriminator: NLayerDiscriminator,
                                lecam: nn.Module | None = None) -> None:
    """Load a discriminator from an official run: the loss module's state dict (accelerate's
    ``checkpoint-N/pytorch_model_1.bin``, keys ``discriminator.*`` beside the LeCam EMAs
    ``ema_real_logits_mean``/``ema_fake_logits_mean`` and the frozen perceptual networks), or a bare
    discriminator state dict. Strict on the discriminator; the LeCam EMAs go into ``lecam`` when present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"loss.disc_init: {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "discriminator."
    if any(k.startswith(prefix) for k in state):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        weights = state
    try:
        discriminator.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold this discriminator (loss.disc_* sizes?): {err}") from None
    if lecam is not None and all(k in state for k in OFFICIAL_LECAM_KEYS):
        lecam.load_state_dict({k: state[k] for k in OFFICIAL_LECAM_KEYS})
        log.info("LeCam EMAs from %s: real %.4f, fake %.4f", path, float(state[OFFICIAL_LECAM_KEYS[0]]),
                 float(state[OFFICIAL_LECAM_KEYS[1]]))
    log.info("discriminator initialised from %s", path)
