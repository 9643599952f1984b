"""What training logs besides losses: gradient orthogonality between losses, and pictures.

Gradient orthogonality (the paper's Table 4): the cosine between the gradients two losses leave on
the same parameters, per parameter group of the Synergistic blocks — Q/K (``q_topo``, ``k_topo``,
``q_norm``, ``k_norm``), V (``v_sem``) and the rest. A loss that cannot reach a group leaves a zero
gradient there, and its cosine is reported as 0.
"""

from __future__ import annotations

import itertools
import textwrap
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
    to size²: near-uniform maps still show where they peak (so never compare two such pictures'
    colours; :func:`save_attention_grid` draws probabilities on a shared scale instead)."""
    v = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size), Image.NEAREST))


def save_attention_grid(images: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor, grid_hw: tuple[int, int],
                        path: str | Path, count: int = 4, teacher_name: str = "teacher",
                        query: tuple[int, int] | None = None) -> Path:
    """Per image (a row): the image with the query token marked, the teacher's and the student's
    head-mean attention of that query in probability units on one colour scale per row (with its
    colour bar), and student − teacher on a symmetric scale. ``query``: (row, col) on the token grid,
    the centre by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid_hw
    qr, qc = query if query is not None else (h // 2, w // 2)
    index = qr * w + qc
    pictures = to_uint8(images[:count])
    rows = min(count, pictures.shape[0])
    fig, axes = plt.subplots(rows, 4, figsize=(13, 2.7 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    size = pictures.shape[1]
    for i in range(rows):
        t = teacher[i, index].detach().float().reshape(h, w).cpu().numpy()
        s = student[i, index].detach().float().reshape(h, w).cpu().numpy()
        top = float(max(t.max(), s.max()))
        spread = float(np.abs(s - t).max()) or 1e-12
        panels = [(pictures[i], None, "image (query ×)"), (t, ("viridis", 0, top), teacher_name),
                  (s, ("viridis", 0, top), "student (head mean)"), (s - t, ("RdBu_r", -spread, spread),
                                                                    "student − teacher")]
        for ax, (data, scale, title) in zip(axes[i], panels):
            if scale is None:
                ax.imshow(data, interpolation="nearest")
                ax.plot((qc + 0.5) * size / w - 0.5, (qr + 0.5) * size / h - 0.5, "x", color="red", ms=10, mew=2)
            else:
                shown = ax.imshow(data, cmap=scale[0], vmin=scale[1], vmax=scale[2], interpolation="nearest")
                ax.plot(qc, qr, "x", color="red", ms=8, mew=2)
                if title != teacher_name:  # the student's bar is the row's shared teacher/student scale
                    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04,
                                 label="probability" if scale[1] == 0 else "difference")
            if i == 0:
                ax.set_title(textwrap.fill(title, 26), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
