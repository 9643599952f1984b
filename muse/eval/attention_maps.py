"""attention-maps: the student's maps next to the teacher's, for a person to read.

For each image: a PNG row per image with the image, the teacher's map and the student's head-mean map
of every block for the centre query token, and a JSON file with each image's topology KL
(head-mean, official formula) per block.

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
from PIL import Image

from muse.data import list_images, preprocess
from muse.training.analysis import heat_picture, save_picture, to_uint8

log = logging.getLogger("muse.eval")


@torch.no_grad()
def attention_maps(model, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(teacher maps (B, N, N), [student head-mean maps (B, N, N) per block])."""
    out = model(images, return_maps=True)
    student = [m if m.dim() == 3 else m.mean(1) for m in out.maps]
    return out.teacher_maps, student


def per_image_kl(teacher: torch.Tensor, student: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over query rows of KL(teacher row ‖ student row), one value per image."""
    t, s = teacher.double(), student.double()
    return (torch.xlogy(t, t) - t * torch.log(s + eps)).sum(-1).mean(-1)


def save_grid(images: torch.Tensor, teacher: torch.Tensor, student: list[torch.Tensor], path: Path) -> Path:
    side = int(round(teacher.shape[-1] ** 0.5))
    query = (side // 2) * side + side // 2
    pictures = to_uint8(images)
    size = pictures.shape[1]
    rows = []
    for i in range(pictures.shape[0]):
        tiles = [pictures[i], heat_picture(teacher[i, query].reshape(side, side).cpu().numpy(), size)]
        tiles += [heat_picture(m[i, query].reshape(side, side).cpu().numpy(), size) for m in student]
        rows.append(np.concatenate(tiles, axis=1))
    return save_picture(np.concatenate(rows, axis=0), size, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Student vs teacher attention maps")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", required=True, help="an image file or a folder of images")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.eval.common import load_tokenizer

    files = list_images(args.images)
    if not files:
        log.error("no images at %s", args.images)
        return 2
    try:
        model, cfg = load_tokenizer(args.config, args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    images = torch.stack([preprocess(Image.open(f), cfg.model.image_size, torch.Generator(), train=False)
                          for f in files])
    teacher, student = attention_maps(model, images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(images, teacher, student, out / "attention_maps.png")
    kls = torch.stack([per_image_kl(teacher, m) for m in student], dim=1)  # (images, blocks)
    report = [{"image": f.name, "kl_per_block": row.tolist()} for f, row in zip(files, kls)]
    (out / "attention_kl.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %s and %s (columns: image, teacher, block 0 … %d)", grid, out / "attention_kl.json",
             len(student) - 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
