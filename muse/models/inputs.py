"""Checks of what callers hand the tokenizer: cheap, once per batch, with messages that say what to do.

uint8 images, or floats in 0..255, run through the tokenizer without an error and give NaN or
meaningless losses; a whole ``Config`` where its ``model`` section is expected fails later with an
``AttributeError``. These checks turn both into errors naming the argument, the value and what is
expected.
"""

from __future__ import annotations

import math

import torch

# Resampling a [-1, 1] image (bicubic, Lanczos) overshoots a little; 0..255 or [0, 255]-scaled floats
# are far outside this margin.
RANGE_MARGIN = 0.1


def check_images(images: torch.Tensor, expected_size: int | tuple[int, int] | None = None,
                 name: str = "images") -> None:
    """``images`` must be a (B, 3, H, W) floating-point tensor with values in [-1, 1] (a margin of
    ``RANGE_MARGIN`` allows resampling overshoot) and, when ``expected_size`` is given (an int for
    square images or (H, W)), that size.

    Costs one min/max pass over the batch and one device-to-host copy of two numbers; callers that
    cannot afford that wait (a captured CUDA graph, a hot loop over trusted data) skip the check
    with their ``check_inputs=False`` switch."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (batch, 3, height, width), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be (batch, 3, height, width), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point with values in [-1, 1], got {images.dtype}; convert 8-bit "
                        "images with images.float() / 127.5 - 1")
    if expected_size is not None:
        height, width = (expected_size, expected_size) if isinstance(expected_size, int) else tuple(expected_size)
        if tuple(images.shape[-2:]) != (height, width):
            raise ValueError(f"{name} must be {height}x{width} (height x width), got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
    if images.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")
    low, high = (float(v) for v in torch.stack(torch.aminmax(images.detach())).float().tolist())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} holds NaN or infinite values (min {low}, max {high})")
    if low < -1 - RANGE_MARGIN or high > 1 + RANGE_MARGIN:
        hint = (" (0..255 pixel values? use images / 127.5 - 1)" if low >= 0 and high > 2
                else " (scale them to [-1, 1])")
        raise ValueError(f"{name} must have values in [-1, 1], got values from {low:.4g} to {high:.4g}{hint}")


def check_model_config(cfg) -> None:
    """``cfg`` must be a ``ModelConfig`` (the ``model`` section of ``load_config(...)``)."""
    from muse.config import Config, ModelConfig

    if isinstance(cfg, Config):
        raise TypeError("MuseTokenizer takes the model section of a config: MuseTokenizer(cfg.model), not the "
                        "whole Config")
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"MuseTokenizer takes a ModelConfig (cfg.model of load_config(...)), got "
                        f"{type(cfg).__name__}")
