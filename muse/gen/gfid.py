"""gfid: the generator's FID and Inception Score — K samples per class, decoded by the tokenizer, against
reference statistics, with the FID InceptionV3 that rFID uses (``muse.eval.inception``).

    muse-eval gfid --generator runs/gen/sana_600m --per-class 50 --cfg-scale 1.5 \\
        --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth --out gfid/

``--reference``: a precomputed ``.npz`` holding ``mu`` and ``sigma`` (the common format of pytorch-fid
and torch-fidelity's statistics files; ADM's reference batches also hold them) or a folder of real
images (searched recursively; each centre-cropped to a square and resized, bicubic, to the generated
images' size, the way ImageNet reference sets are prepared); ``--save-reference FILE.npz`` writes the
folder's statistics for reuse. Generated images: the decoder's output clamped to [-1, 1] and
rounded to 8 bits, the network's uint8 input. Features are streamed (two 2048² float64 sums), so 50 000
samples (50 per ImageNet class) fit in memory. The JSON records every setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from muse.data import IMAGE_SUFFIXES
from muse.eval.metrics import GaussianStatistics, InceptionScoreStatistics, frechet_distance
from muse.eval.transforms import round_to_8bit

log = logging.getLogger("muse.eval")



class FeatureStatistics:
    """Streamed Inception statistics of uint8 image batches: the pool features' mean and covariance,
    and (``score``) the Inception Score. ``inception``: uint8 (B, 3, H, W) → {"pool", "logits_unbiased"}
    (the FID network or a stand-in; the sizes are read from its first output)."""

    def __init__(self, inception, score: bool = True, device: str | torch.device = "cpu"):
        self.inception, self.with_score, self.device = inception, score, device
        self.gaussian = self.score = None

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        out = self.inception(images)
        if self.gaussian is None:
            self.gaussian = GaussianStatistics(out["pool"].shape[1], self.device)
            if self.with_score:
                self.score = InceptionScoreStatistics(out["logits_unbiased"].shape[1], self.device)
        self.gaussian.update(out["pool"])
        if self.score is not None:
            self.score.update(out["logits_unbiased"])

    @property
    def count(self) -> int:
        return 0 if self.gaussian is None else self.gaussian.count

    def mean_and_covariance(self):
        if self.gaussian is None:
            raise ValueError("no images were measured")
        return self.gaussian.mean_and_covariance()


def load_reference_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data]
        if missing:
            raise ValueError(f"--reference {path} has no {', '.join(missing)} (it holds {', '.join(data.files)}): a "
                             "statistics file holds mu (D,) and sigma (D, D)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"--reference {path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma


def reference_images(folder: str | os.PathLike, size: int):
    """uint8 (3, size, size) tensors of every image under ``folder``, sorted, centre-cropped square
    and resized (bicubic)."""
    from PIL import Image

    from muse.eval.transforms import center_crop, resize_shorter_edge

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--reference {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    for file in files:
        image = Image.open(file).convert("RGB")
        image = center_crop(resize_shorter_edge(image, size), size)
        yield torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def folder_statistics(folder, inception, size: int, batch_size: int, progress=None, device="cpu"):
    stats = FeatureStatistics(inception, score=False, device=device)
    batch = []
    for image in reference_images(folder, size):
        batch.append(image)
        if len(batch) == batch_size:
            stats.update(torch.stack(batch).to(device))
            batch = []
            if progress is not None:
                progress.update(batch_size)
    if batch:
        stats.update(torch.stack(batch).to(device))
        if progress is not None:
            progress.update(len(batch))
    return stats.mean_and_covariance()


def generated_statistics(batches, inception, progress=None, device="cpu") -> tuple[np.ndarray, np.ndarray, float, int]:
    """``batches``: [-1, 1] image batches → (mean, covariance, Inception Score, count)."""
    stats = FeatureStatistics(inception, device=device)
    for images in batches:
        stats.update(round_to_8bit(images).to(device))
        if progress is not None:
            progress.update(len(images))
    mean, covariance = stats.mean_and_covariance()
    return mean, covariance, stats.score.compute(), stats.count


def generate(model, tokenizer, labels: torch.Tensor, seeds: list[int], batch_size: int, settings: dict):
    """Decoded [-1, 1] samples, batch by batch."""
    from muse.gen.sample import decode, sample_latents

    for start in range(0, len(labels), batch_size):
        latents = sample_latents(model, labels[start:start + batch_size], seeds[start:start + batch_size], **settings)
        yield decode(tokenizer, latents)


def main(argv=None) -> int:
    from muse.gen.sample import add_sampling_arguments, load_decoder, load_generator, sampling_settings

    parser = argparse.ArgumentParser(description="gFID and Inception Score of the generator's samples")
    add_sampling_arguments(parser)
    parser.add_argument("--per-class", type=int, default=50, help="samples per class (50: 50 000 for ImageNet)")
    parser.add_argument("--classes", type=int, nargs="+", help="default: every class of the generator")
    parser.add_argument("--reference", required=True, help="mu/sigma .npz, or a folder of real images")
    parser.add_argument("--save-reference", help="write a folder reference's statistics to this .npz")
    parser.add_argument("--inception-weights", default=os.environ.get("MUSE_INCEPTION_WEIGHTS"),
                        help="pt_inception-2015-12-05-6726825d.pth (default: $MUSE_INCEPTION_WEIGHTS)")
    parser.add_argument("--inception-dtype", choices=("float64", "float32"), default="float64",
                        help="float64 as the official rFID evaluator; float32 is faster")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.eval.features import progress_bar
    from muse.eval.inception import load_fid_inception

    try:
        if not args.inception_weights:
            raise FileNotFoundError("gFID needs the FID Inception weights: pass --inception-weights "
                                    "(pt_inception-2015-12-05-6726825d.pth) or set $MUSE_INCEPTION_WEIGHTS")
        if not Path(args.reference).exists():
            raise FileNotFoundError(f"--reference {args.reference}: no such file or folder")
        if args.per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
        inception = load_fid_inception(args.inception_weights, getattr(torch, args.inception_dtype), args.device)
        model, cfg = load_generator(args.generator, args.weights, args.device)
        classes = args.classes if args.classes is not None else list(range(cfg.model.num_classes))
        bad = [c for c in classes if not 0 <= c < cfg.model.num_classes]
        if bad:
            raise ValueError(f"--classes {bad[:5]}: the generator has classes 0..{cfg.model.num_classes - 1}")
        tokenizer = load_decoder(cfg, args, args.device)
        settings = sampling_settings(cfg, args)
        labels = torch.tensor([c for c in classes for _ in range(args.per_class)])
        seeds = list(range(args.seed, args.seed + len(labels)))
        bar = progress_bar(len(labels), "sampling")
        try:
            mean, covariance, inception_score, count = generated_statistics(
                generate(model, tokenizer, labels, seeds, args.batch_size, settings), inception, bar, args.device)
        finally:
            if bar is not None:
                bar.close()
        size = cfg.model.latent_size * 2 * tokenizer.patch_size
        if Path(args.reference).is_dir():
            bar = progress_bar(None, "reference images")
            try:
                ref_mean, ref_cov = folder_statistics(args.reference, inception, size, args.batch_size, bar, args.device)
            finally:
                if bar is not None:
                    bar.close()
            if args.save_reference:
                np.savez(args.save_reference, mu=ref_mean, sigma=ref_cov)
        else:
            ref_mean, ref_cov = load_reference_npz(args.reference)
        if ref_mean.shape != mean.shape:
            raise ValueError(f"--reference has {ref_mean.shape[0]}-d statistics, the Inception pool {mean.shape[0]}-d")
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    report = {"gfid": frechet_distance(ref_mean, ref_cov, mean, covariance), "inception_score": inception_score,
              "samples": count, "classes": len(classes), "per_class": args.per_class, **settings,
              "seed": args.seed, "image_size": size, "generator": args.generator, "weights": args.weights,
              "reference": args.reference, "inception_dtype": args.inception_dtype}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gfid.json").write_text(json.dumps(report, indent=1))
    log.info("gFID %.3f, IS %.2f over %d samples (%s, %d steps, CFG %.2f) → %s", report["gfid"], inception_score,
             count, settings["sampler"], settings["steps"], settings["cfg_scale"], out / "gfid.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
