"""Ψ: resize attention maps between token grids, as two GEMMs.

A map (B, h_s·w_s, h_s·w_s) is resized bilinearly (align_corners=False) over its key grid and then
over its query grid, and its rows renormalized. Bilinear resizing is separable and linear, so on a
flattened grid it is a matrix: kron(R_h, R_w), with R the 1-D interpolation matrices. The two passes
become M·A·Mᵀ, two dense GEMMs instead of B·N per-row interpolations. The matrices are built by
interpolating the identity with ``F.interpolate`` itself, so their weights are exactly PyTorch's,
and cached per (sizes, device, dtype) — but only outside dispatch modes and compilation: a matrix
built on fake tensors (a FLOP count) or while tracing must not be handed to later real calls.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

RENORM_EPS = 1e-6


def _interp_matrix_1d(src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dst, src) matrix R with R @ x == F.interpolate(x, size=dst, mode="linear", align_corners=False)."""
    eye = torch.eye(src, dtype=torch.float64, device=device)[:, None, :]  # src signals of length src
    rows = F.interpolate(eye, size=dst, mode="linear", align_corners=False)[:, 0, :]  # (src, dst)
    return rows.t().contiguous().to(dtype)


def _build_interpolation_matrix(source_hw: tuple[int, int], target_hw: tuple[int, int], device: torch.device,
                                dtype: torch.dtype) -> torch.Tensor:
    r_h = _interp_matrix_1d(source_hw[0], target_hw[0], device, torch.float64)
    r_w = _interp_matrix_1d(source_hw[1], target_hw[1], device, torch.float64)
    return torch.kron(r_h, r_w).to(dtype)


_cached_interpolation_matrix = functools.lru_cache(maxsize=64)(_build_interpolation_matrix)


def interpolation_matrix(source_hw: tuple[int, int], target_hw: tuple[int, int], device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """(h_t·w_t, h_s·w_s) bilinear (align_corners=False) resize of a flattened row-major grid."""
    if is_in_torch_dispatch_mode() or torch.compiler.is_compiling():
        return _build_interpolation_matrix(source_hw, target_hw, device, dtype)
    return _cached_interpolation_matrix(source_hw, target_hw, device, dtype)


def _grid(value, name: str) -> tuple[int, int]:
    # numbers.Integral admits numpy integers; a torch.Size or a numpy array of two works as a pair.
    pair = tuple(value) if isinstance(value, (tuple, list, torch.Size, np.ndarray)) else None
    if (pair is None or len(pair) != 2
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) and x >= 1 for x in pair)):
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {value!r}")
    return int(pair[0]), int(pair[1])


def resize_attention_4d(attn: torch.Tensor, target_hw, source_hw=None) -> torch.Tensor:
    """Resize attention maps (B, h_s·w_s, h_s·w_s) → (B, h_t·w_t, h_t·w_t).

    Bilinear with align_corners=False over the key grid, then over the query grid, then every row
    divided by (its sum + 1e-6): the same numbers as two passes of ``F.interpolate`` and a
    renormalization. The source grid is square unless ``source_hw`` is given. Computed in fp32
    (fp64 for fp64 maps) and returned in ``attn``'s dtype.
    """
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn must be (batch, tokens, tokens), got shape {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise TypeError(f"attn must be a floating-point tensor, got {attn.dtype}")
    tokens = attn.shape[1]
    target_hw = _grid(target_hw, "target_hw")
    if source_hw is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"attn has {tokens} tokens, not a square grid: pass source_hw=(h, w)")
        source_hw = (side, side)
    source_hw = _grid(source_hw, "source_hw")
    if source_hw[0] * source_hw[1] != tokens:
        raise ValueError(f"source_hw {source_hw} has {source_hw[0] * source_hw[1]} cells but attn has {tokens} tokens")

    compute_dtype = torch.promote_types(attn.dtype, torch.float32)
    resize = interpolation_matrix(source_hw, target_hw, attn.device, compute_dtype)
    # Autocast would run the GEMMs in bf16 and break the rows' normalization.
    with torch.autocast(attn.device.type, enabled=False):
        resized = resize @ attn.to(compute_dtype) @ resize.t()
        resized = resized / (resized.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return resized.to(attn.dtype)
