"""``make demo``: build shards from real photos once, then train the tiny tokenizer through all three
stages and summarize. No download, no GPU (a GPU is used when present: the Triton kernels then run).

The photos are scikit-image's sample images, which ship with the package; the captions are ours.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from muse.config import load_config
from muse.data import expand_shards, write_shards

log = logging.getLogger("muse.demo")

CAPTIONS = {
    "astronaut": "an astronaut in a white space suit in front of an american flag",
    "chelsea": "a tabby cat with green eyes looking up",
    "coffee": "a cup of coffee with latte art on a saucer",
    "rocket": "a rocket standing on the launch pad under a blue sky",
    "hubble_deep_field": "thousands of galaxies in the deep dark sky",
    "immunohistochemistry": "stained tissue cells seen through a microscope",
    "retina": "a photograph of the back of a human eye",
    "camera": "a man with a camera on a tripod in a field",
    "brick": "a wall of grey bricks",
    "grass": "a close view of grass",
    "gravel": "a patch of gravel stones",
    "moon": "the surface of the moon with craters",
    "coins": "old coins lying on a dark table",
    "clock": "a wall clock photographed at an angle",
    "page": "a page of printed text",
    "text": "handwritten and printed letters on a board",
    "microaneurysms": "a blurry retinal scan with small dots",
    "logo": "a colourful logo on a white background",
}


def demo_images():
    import skimage.data

    for name, caption in CAPTIONS.items():
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        yield {"image": image[..., :3].astype(np.uint8), "caption": caption}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--steps", type=int, default=60, help="steps per stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("muse.train").setLevel(logging.WARNING)
    from muse.train import train

    out = Path(args.out)
    shard_dir = out / "shards"
    if not list(shard_dir.glob("shard-*.tar")):
        shards = write_shards(demo_images(), shard_dir, samples_per_shard=6)
        log.info("wrote %d photos into %d shards in %s", len(CAPTIONS), len(shards), shard_dir)
    pattern = str(shard_dir / "shard-*.tar")
    expand_shards(pattern)

    rows, previous, start = [], None, time.perf_counter()
    for stage in (1, 2, 3):
        overrides = [f"data.shards=['{pattern}']", f"train.out_dir={out / f'stage{stage}'}",
                     f"train.steps={args.steps}", f"train.ckpt_every={args.steps}",
                     f"train.image_every={args.steps}", f"train.ortho_every={args.steps}",
                     f"train.init_weight={previous if previous else 'null'}"]
        summary = train(load_config(f"tiny/stage{stage}", overrides))
        first, last = summary["history"][0], summary["history"][-1]
        rows.append((stage, first, last, summary["checkpoint"]))
        previous = summary["out_dir"]

    log.info("\nMUSE tiny tokenizer, three stages of %d steps in %.0f s", args.steps, time.perf_counter() - start)
    log.info("%-6s %-13s %-13s %-13s %-8s %s", "stage", "total loss", "reconstr.", "topology", "img/s", "checkpoint")
    for stage, first, last, checkpoint in rows:
        log.info("%-6d %-13s %-13s %-13s %-8.1f %s", stage, f"{first['total']:.3f}→{last['total']:.3f}",
                 f"{first['reconstruction']:.3f}→{last['reconstruction']:.3f}",
                 f"{first['topology']:.3f}→{last['topology']:.3f}", last["img_per_s"], checkpoint)
    log.info("logs: %s/stage*/log.jsonl (TensorBoard: %s/stage*/tensorboard); pictures: %s/stage*/images/",
             out, out, out)
    cosines = {k: v for k, v in rows[-1][2].items() if k.startswith("cos/")}
    if cosines:
        log.info("stage 3 gradient cosines on the blocks: %s",
                 ", ".join(f"{k.removeprefix('cos/')} {v:+.3f}" for k, v in sorted(cosines.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
