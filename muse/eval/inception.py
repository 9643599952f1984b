"""The FID InceptionV3 (TensorFlow's 2015-12-05 graph, as ported by pytorch-fid and torch-fidelity), for
rFID and the Inception Score, with its weights from a local file.

The official evaluator runs torch-fidelity's ``FeatureExtractorInceptionV3`` on the weights file
``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity ships the same file as
``weights-inception-2015-12-05-6726825d.pth``). torch-fidelity imports torchvision, which cannot be
installed beside every torch build, so the network is built here with torch-fidelity's module names and
the file loads strictly into it. What makes it the TF graph rather than torchvision's InceptionV3:
uint8 input resized to 299² by TensorFlow 1.x's bilinear rule, scaled to (x − 128) / 128; average pools
that leave the zero padding out of the mean; max pooling in the last block's pool branch; 1008 classes.
Features: the 2048-d pool output (FID) and ``pool @ fc.weightᵀ`` without the bias (torch-fidelity's
"logits_unbiased", the Inception Score's input).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("muse.eval")

INPUT_SIZE = 299
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU: ``conv.*`` and ``bn.*`` in the file."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow averages a 3×3 window over its in-image pixels only.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for index in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{index}")(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        tower = x
        for index in range(1, 5):
            tower = getattr(self, f"branch7x7x3_{index}")(tower)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the pool branch of the graph's last block max-pools (the one before averages)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear`` (align_corners False): output pixel i samples input position
    i · (in / out) (the scale in float32, as TF computes it), between its floor and the next pixel,
    clamped at the border. (B, C, H, W) floating point."""
    def axis(length: int):
        scale = float(np.float32(length / size))
        position = torch.arange(size, dtype=images.dtype, device=images.device) * scale
        low = position.long()
        return low, (low + 1).clamp_max(length - 1), position - low.to(images.dtype)

    y_low, y_high, y_frac = axis(images.shape[2])
    x_low, x_high, x_frac = axis(images.shape[3])
    top, bottom = images[:, :, y_low], images[:, :, y_high]
    x_frac = x_frac.view(1, 1, 1, size)
    top = top[..., x_low] + (top[..., x_high] - top[..., x_low]) * x_frac
    bottom = bottom[..., x_low] + (bottom[..., x_high] - bottom[..., x_low]) * x_frac
    return top + (bottom - top) * y_frac.view(1, 1, size, 1)


class FidInceptionV3(nn.Module):
    """uint8 (B, 3, H, W) images → {"pool": (B, 2048), "logits_unbiased": (B, 1008)}, computed in
    ``dtype`` (the official evaluator: float64)."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.MaxPool_2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1008)
        self.to(dtype).requires_grad_(False).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"the Inception network reads uint8 (batch, 3, H, W) images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.to(self.dtype), INPUT_SIZE)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
            x = getattr(self, name)(x)
        pool = x.flatten(1)
        return {"pool": pool, "logits_unbiased": pool @ self.fc.weight.t()}


def load_fid_inception(weights: str | Path, dtype: torch.dtype = torch.float64,
                       device: str | torch.device = "cpu") -> FidInceptionV3:
    """The network with the weights of a local ``pt_inception-2015-12-05-6726825d.pth`` (strict: every
    name and shape must match; nothing is downloaded)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {str(weights)!r}: no such file (torch-fidelity's / "
                                f"pytorch-fid's {WEIGHTS_FILE})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = FidInceptionV3(dtype)
    own = model.state_dict()
    # Files saved before BatchNorm counted its batches have no counters; load_state_dict fills them in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        problems = [f"{len(found)} {what}: {', '.join(found[:3])}{', …' if len(found) > 3 else ''}"
                    for what, found in (("missing", missing), ("unexpected", unexpected),
                                        ("of another shape", mismatched)) if found]
        raise ValueError(f"Inception weights {path} do not fit the FID InceptionV3 ({WEIGHTS_FILE} expected): "
                         + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model.to(device)
