"""attention-maps: the student's maps next to the teacher's, for a person to read.

One PNG per image: a row per Synergistic block with, for one query token (the centre by default,
``--query ROW,COL`` on the token grid), the image with the query marked, the teacher's map, the
student's head-mean map, that map over the image, then each head's map; a header names the columns.
``attention_kl.json`` has each image's topology KL per block, head-mean (the official formula) and per
head.

    python -m muse.eval.attention_maps --config tiny --checkpoint demo_out/stage3 --images photos/ --out maps/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from muse.data import list_images, preprocess
from muse.eval.common import add_model_arguments
from muse.training.analysis import heat_picture, to_uint8

log = logging.getLogger("muse.eval")

MIN_TILE = 128  # tiny models' 32-pixel tiles are enlarged to be readable


@torch.no_grad()
def attention_maps(model, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """(teacher maps (B, N, N), [student per-head maps (B, H, N, N) per block], token grid (h, w)), on
    the CPU, from the model on its own device."""
    images = images.to(next(model.parameters()).device)
    model._check_images(images)
    x, h, w = model._tokens(images)
    teacher = model.teacher_maps(images, (h, w))
    student = []
    for block in model.muse_blocks:
        out = block(x, return_attn="per_head")
        x = out.x
        student.append(out.attn.float().cpu())
    return teacher.cpu(), student, (h, w)


def per_image_kl(teacher: torch.Tensor, student: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over query rows of KL(teacher row ‖ student row), one value per image (and head, for
    per-head maps (B, H, N, N))."""
    t, s = teacher.double(), student.double()
    if s.dim() == 4:
        t = t[:, None]
    return (torch.xlogy(t, t) - t * torch.log(s + eps)).sum(-1).mean(-1)


def image_panel(image: np.ndarray, teacher: torch.Tensor, student: list[torch.Tensor], grid: tuple[int, int],
                query: int) -> tuple[np.ndarray, list[str]]:
    """One image's panel (blocks × [image, teacher, mean, overlay, heads…]) and its column names."""
    h, w = grid
    size = image.shape[0]
    marked = image.copy()
    row, col = divmod(query, w)
    cell_h, cell_w = size // h, size // w
    box = marked[row * cell_h:(row + 1) * cell_h, col * cell_w:(col + 1) * cell_w]
    box[[0, -1], :] = (0, 255, 0)
    box[:, [0, -1]] = (0, 255, 0)
    teacher_tile = heat_picture(teacher[query].reshape(h, w).cpu().numpy(), size)
    rows = []
    for maps in student:
        mean = heat_picture(maps.mean(0)[query].reshape(h, w).cpu().numpy(), size)
        overlay = (0.45 * image + 0.55 * mean).astype(np.uint8)
        heads = [heat_picture(m[query].reshape(h, w).cpu().numpy(), size) for m in maps]
        rows.append(np.concatenate([marked, teacher_tile, mean, overlay, *heads], axis=1))
    names = ["image", "teacher", "head mean", "overlay"] + [f"head {i}" for i in range(student[0].shape[0])]
    return np.concatenate(rows, axis=0), names


def save_panel(panel: np.ndarray, names: list[str], tile: int, path: Path) -> Path:
    """The panel enlarged to readable tiles, with a header of column names and block labels."""
    factor = max(1, -(-MIN_TILE // tile))
    picture = Image.fromarray(panel).resize((panel.shape[1] * factor, panel.shape[0] * factor), Image.NEAREST)
    size = tile * factor
    header, margin = 18, 60
    canvas = Image.new("RGB", (picture.width + margin, picture.height + header), "white")
    canvas.paste(picture, (margin, header))
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate(names):
        draw.text((margin + column * size + 4, 3), name, fill="black")
        if column:
            draw.line([(margin + column * size, header), (margin + column * size, canvas.height)], fill="white", width=2)
    for block in range(picture.height // size):
        draw.text((4, header + block * size + size // 2 - 6), f"block {block}", fill="black")
    canvas.save(path)
    return path


def parse_query(text: str | None, grid: tuple[int, int]) -> int:
    h, w = grid
    if text is None:
        return (h // 2) * w + w // 2
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--query must be ROW,COL on the {h}x{w} token grid, got {text!r}") from None
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"--query {row},{col} is outside the {h}x{w} token grid")
    return row * w + col


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Student vs teacher attention maps")
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, help="an image file or a folder of images")
    parser.add_argument("--query", help="ROW,COL of the query token on the token grid (default: the centre)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.eval.common import load_from_args

    files = list_images(args.images)
    if not files:
        log.error("no images at %s", args.images)
        return 2
    try:
        model, cfg = load_from_args(args)
        images = torch.stack([preprocess(Image.open(f), cfg.model.image_size, torch.Generator(), train=False)
                              for f in files])
        teacher, student, grid = attention_maps(model, images)
        query = parse_query(args.query, grid)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = to_uint8(images)
    report = []
    for i, file in enumerate(files):
        panel, names = image_panel(pictures[i], teacher[i], [m[i] for m in student], grid, query)
        save_panel(panel, names, pictures.shape[1], out / f"{file.stem}_attention.png")
        report.append({"image": file.name, "query": divmod(query, grid[1]),
                       "kl_per_block": [float(per_image_kl(teacher[i:i + 1], m[i:i + 1].mean(1))) for m in student],
                       "kl_per_block_head": [per_image_kl(teacher[i:i + 1], m[i:i + 1])[0].tolist() for m in student]})
    (out / "attention_kl.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %d attention panels (rows: blocks; columns: %s) and %s to %s", len(files), ", ".join(names[:4]) +
             ", heads", "attention_kl.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
