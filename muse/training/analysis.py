"""What training logs besides losses: gradient orthogonality between losses, and pictures.

Gradient orthogonality (the paper's Table 4): the cosine between the gradients two losses leave on
the same parameters, per parameter group of the Synergistic blocks — Q/K (``q_topo``, ``k_topo``,
``q_norm``, ``k_norm``), V (``v_sem``) and the rest. A loss that cannot reach a group leaves a zero
gradient there, and its cosine is reported as 0.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GROUPS = {"qk": ("q_topo", "k_topo", "q_norm", "k_norm"), "v": ("v_sem",)}


def parameter_group(name: str) -> str | None:
    """'qk', 'v' or 'rest' for a parameter of a Synergistic block (``muse_blocks.<i>.<group>...``)."""
    parts = name.split(".")
    if parts[0] != "muse_blocks" or len(parts) < 3:
        return None
    for group, members in GROUPS.items():
        if parts[2] in members:
            return group
    return "rest"


def gradient_cosines(model: torch.nn.Module, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine between every pair of losses' gradients, per block parameter group: keys
    ``"<loss_a>|<loss_b>/<group>"``. The graph is kept; no ``.grad`` is touched."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and parameter_group(n)]
    grads = {}
    for name, loss in losses.items():
        got = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
        grads[name] = {}
        for (pname, param), g in zip(params, got):
            group = parameter_group(pname)
            flat = torch.zeros(param.numel(), device=param.device) if g is None else g.detach().float().flatten()
            grads[name].setdefault(group, []).append(flat)
    result = {}
    for a, b in itertools.combinations(grads, 2):
        for group in grads[a]:
            ga, gb = torch.cat(grads[a][group]), torch.cat(grads[b][group])
            denom = ga.norm() * gb.norm()
            result[f"{a}|{b}/{group}"] = float(ga @ gb / denom) if denom > 0 else 0.0
    return result


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_picture(grid: np.ndarray, tile: int, path: str | Path, min_tile: int = 128) -> Path:
    """Small tiles (tiny models' 32-pixel images) are enlarged, pixel for pixel, to be readable."""
    image = Image.fromarray(grid)
    if tile < min_tile:
        factor = -(-min_tile // tile)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image.save(path)
    return Path(path)


def save_reconstruction_grid(images: torch.Tensor, reconstruction: torch.Tensor, path: str | Path, count: int = 8) -> Path:
    """Inputs on the top row, reconstructions below."""
    top, bottom = to_uint8(images[:count]), to_uint8(reconstruction[:count])
    grid = np.concatenate([np.concatenate(list(top), axis=1), np.concatenate(list(bottom), axis=1)], axis=0)
    return save_picture(grid, top.shape[1], path)


def heat_picture(values: np.ndarray, size: int) -> np.ndarray:
    """A map → an RGB heat picture (black → red → yellow → white) over its own min–max range, upsampled
    to size²: near-uniform maps still show where they peak."""
    v = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size), Image.NEAREST))


def save_attention_grid(images: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor, grid_hw: tuple[int, int],
                        path: str | Path, count: int = 4) -> Path:
    """Per image: the image, the teacher's map and the student's head-mean map for the centre query token."""
    h, w = grid_hw
    query = (h // 2) * w + w // 2
    pictures = to_uint8(images[:count])
    size = pictures.shape[1]
    rows = []
    for i in range(min(count, pictures.shape[0])):
        t = teacher[i, query].detach().float().reshape(h, w).cpu().numpy()
        s = student[i, query].detach().float().reshape(h, w).cpu().numpy()
        rows.append(np.concatenate([pictures[i], heat_picture(t, size), heat_picture(s, size)], axis=1))
    return save_picture(np.concatenate(rows, axis=0), size, path)
