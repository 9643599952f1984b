"""reconstruct: reconstructions side by side with their inputs, with per-image PSNR and SSIM.

    python -m muse.eval.reconstruct --config tiny --checkpoint demo_out/stage3 --images photos/ --out recon/
    python -m muse.eval.reconstruct --config tiny --checkpoint demo_out/stage3 --shards 'shards/*.tar' \\
        --metrics --max-images 500 --out recon/

Images are resized (shorter edge) and centre-cropped to the model's input size. ``--metrics`` writes
the mean PSNR and SSIM (and per image) to ``metrics.json``; ``recon-metrics`` adds LPIPS and rFID over
whole evaluation sets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from muse.data import expand_shards, list_images, preprocess, read_once
from muse.eval.common import add_model_arguments, positive_int
from muse.eval.metrics import psnr, ssim
from muse.training.analysis import to_uint8

log = logging.getLogger("muse.eval")


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Reconstructions (on the images' device) of images run through the model on its own device."""
    device = next(model.parameters()).device
    return torch.cat([model.decode(model.encode(chunk.to(device))).to(images.device)
                      for chunk in images.split(batch_size)])


def _load_images(args, size: int) -> tuple[list[str], torch.Tensor]:
    if args.images:
        files = list_images(args.images)
        if not files:
            raise FileNotFoundError(f"no images at {args.images}")
        pixels = [preprocess(Image.open(f), size, torch.Generator(), train=False) for f in files]
        return [f.name for f in files], torch.stack(pixels)
    samples = list(itertools.islice(read_once(expand_shards(args.shards), size), args.max_images))
    if not samples:
        raise FileNotFoundError(f"no decodable samples in {args.shards}")
    return [s["key"] for s in samples], torch.stack([s["image"] for s in samples])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Reconstruct images and measure PSNR/SSIM")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="an image file or a folder of images")
    source.add_argument("--shards", help="a shard pattern")
    parser.add_argument("--max-images", type=positive_int, default=1000)
    parser.add_argument("--metrics", action="store_true", help="write metrics.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.eval.common import load_from_args

    try:
        model, cfg = load_from_args(args)
        names, images = _load_images(args, cfg.model.image_size)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    recon = reconstruct(model, images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    originals, rebuilt = to_uint8(images), to_uint8(recon)
    for name, a, b in zip(names, originals, rebuilt):
        Image.fromarray(np.concatenate([a, b], axis=1)).save(out / f"{Path(name).stem}_recon.png")
    if args.metrics:
        p, s = psnr(recon, images), ssim(recon, images)
        report = {"images": len(names), "psnr": float(p.mean()), "ssim": float(s.mean()),
                  "per_image": [{"image": n, "psnr": float(a), "ssim": float(b)} for n, a, b in zip(names, p, s)]}
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        log.info("%d images: PSNR %.2f dB, SSIM %.4f", len(names), report["psnr"], report["ssim"])
    log.info("wrote %d side-by-side PNGs to %s", len(names), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
