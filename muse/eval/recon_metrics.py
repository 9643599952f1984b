"""recon-metrics: PSNR, SSIM, rFID and the Inception Score of the tokenizer's reconstructions (and LPIPS
on request) over evaluation shards.

    muse-eval recon-metrics --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --shards 'imagenet-val-{000000..000049}.tar' \\
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth --out recon_metrics/

``--protocol official`` (default), ``scripts/evaluate.py`` with ``muse/evaluation/evaluator.py``:
images Resize(S) + CenterCrop(S) (bicubic) at the model's size S, the reconstruction clamped and
rounded to 8 bits; PSNR on [0, 1]; SSIM by scikit-image's rule (7×7 uniform window), reported twice:
``ssim_official_data_range_2`` (the official call's ``data_range=2.0`` on [0, 1] pixels, a defect that
inflates it) and ``ssim_data_range_1`` (the correct value); rFID from the FID InceptionV3's 2048-d pool
features and the Inception Score (one split) of the reconstructions, the network in float64 fed the
uint8 images the official code makes. ``--protocol fast``: the training centre crop, float
reconstructions, Gaussian SSIM (range 1), Inception in float32 on the exact 8-bit levels.

The Inception weights are torch-fidelity's / pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
from ``--inception-weights`` or ``$MUSE_INCEPTION_WEIGHTS`` (nothing is downloaded); ``--skip fid``
leaves rFID and IS out. Features are streamed (two 2048² sums), so 50 000 images fit in memory.
``--lpips vgg`` adds torchmetrics' LPIPS (needs torchvision and its backbone weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

from muse.eval.common import add_model_arguments, positive_int
from muse.eval.metrics import (GaussianStatistics, InceptionScoreStatistics, frechet_distance, psnr_unit, ssim,
                               ssim_uniform)
from muse.eval.protocols import RECON, add_protocol_arguments, describe, resolve_protocol
from muse.eval.transforms import official_inception_levels, round_to_8bit

log = logging.getLogger("muse.eval")

POOL_DIM, INCEPTION_CLASSES = 2048, 1008


def build_lpips(net: str):
    """torchmetrics' LPIPS with ImageNet backbone weights from torchvision's cache."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchmetrics.utilities.imports import _TORCHVISION_AVAILABLE

    if not _TORCHVISION_AVAILABLE:
        raise ModuleNotFoundError("LPIPS needs torchvision (its VGG/AlexNet backbone); leave --lpips out")
    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean", normalize=False)


class ReconstructionMetrics:
    """Running PSNR and SSIM (per image), rFID and Inception Score (streamed statistics) and LPIPS over
    batches of [-1, 1] reconstructions and their targets (8-bit images in [-1, 1]), by ``settings``.

    ``inception``: uint8 (B, 3, H, W) → {"pool": (B, D), "logits_unbiased": (B, K)} (the FID network,
    or a stand-in); ``lpips``: a torchmetrics-style metric on [-1, 1] images. Either may be None."""

    def __init__(self, settings=RECON["official"], inception=None, lpips=None, pool_dim: int = POOL_DIM,
                 classes: int = INCEPTION_CLASSES, device: str | torch.device = "cpu"):
        self.settings, self.inception, self.lpips = settings, inception, lpips
        self.psnr: list[float] = []
        self.ssim: dict[str, list[float]] = {}
        if inception is not None:
            self.real, self.fake = GaussianStatistics(pool_dim, device), GaussianStatistics(pool_dim, device)
            self.inception_score = InceptionScoreStatistics(classes, device)

    def _inception_inputs(self, reconstruction: torch.Tensor, target: torch.Tensor):
        real, fake = round_to_8bit(target), round_to_8bit(reconstruction)
        if self.settings.inception_input == "official_float":
            return official_inception_levels(real, "real"), official_inception_levels(fake, "reconstruction")
        if self.settings.inception_input == "exact":
            return real, fake
        raise ValueError(f"inception_input must be official_float or exact, got {self.settings.inception_input!r}")

    @torch.no_grad()
    def update(self, reconstruction: torch.Tensor, target: torch.Tensor) -> None:
        if reconstruction.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
        reconstruction = reconstruction.float().clamp(-1, 1)
        if self.settings.round_8bit:
            # Both sides as exact 8-bit levels k / 255 (the targets are decoded 8-bit images).
            x, y = round_to_8bit(reconstruction).double() / 255, round_to_8bit(target).double() / 255
            reconstruction = x.float() * 2 - 1
        else:
            x, y = (reconstruction.double() + 1) / 2, (target.double().clamp(-1, 1) + 1) / 2
        self.psnr += psnr_unit(x, y).tolist()
        if self.settings.ssim_window == "uniform7":
            self.ssim.setdefault("ssim_official_data_range_2", []).extend(ssim_uniform(x, y, data_range=2.0).tolist())
            self.ssim.setdefault("ssim_data_range_1", []).extend(ssim_uniform(x, y, data_range=1.0).tolist())
        elif self.settings.ssim_window == "gaussian11":
            self.ssim.setdefault("ssim_data_range_1", []).extend(ssim(reconstruction, target).tolist())
        else:
            raise ValueError(f"ssim_window must be uniform7 or gaussian11, got {self.settings.ssim_window!r}")
        if self.lpips is not None:
            self.lpips.update(reconstruction, target.float().clamp(-1, 1))
        if self.inception is not None:
            real, fake = self._inception_inputs(reconstruction, target)
            real_out, fake_out = self.inception(real), self.inception(fake)
            self.real.update(real_out["pool"])
            self.fake.update(fake_out["pool"])
            self.inception_score.update(fake_out["logits_unbiased"])

    def compute(self) -> dict:
        if not self.psnr:
            raise ValueError("no images were measured")
        finite = [p for p in self.psnr if math.isfinite(p)]
        report = {"images": len(self.psnr), "psnr": sum(self.psnr) / len(self.psnr),
                  "psnr_finite_mean": sum(finite) / len(finite) if finite else None}
        report.update({name: sum(values) / len(values) for name, values in self.ssim.items()})
        if self.lpips is not None:
            report["lpips"] = float(self.lpips.compute())
        if self.inception is not None:
            if len(self.psnr) < 2:
                raise ValueError("rFID needs at least 2 images")
            report["rfid"] = frechet_distance(*self.real.mean_and_covariance(), *self.fake.mean_and_covariance())
            report["inception_score"] = self.inception_score.compute()
        return report


@torch.no_grad()
def measure(model, batches, metrics: ReconstructionMetrics, device="cpu", progress=None) -> dict:
    """Reconstruct each batch of images and accumulate ``metrics``; returns ``metrics.compute()``."""
    for images in batches:
        images = images.to(device)
        metrics.update(model.decode(model.encode(images), size=tuple(images.shape[-2:])), images)
        if progress is not None:
            progress.update(len(images))
    return metrics.compute()


def run(args, settings) -> dict:
    """The metrics for parsed arguments and resolved settings (what ``main`` and ``table`` run)."""
    from muse.data import batched, expand_shards
    from muse.eval.common import load_from_args
    from muse.eval.features import progress_bar
    from muse.eval.inception import load_fid_inception
    from muse.eval.transforms import make_pipeline, read_raw

    shards = expand_shards(args.shards)
    inception = None
    if "fid" not in args.skip:
        if not args.inception_weights:
            raise FileNotFoundError("rFID and IS need the FID Inception weights: pass --inception-weights "
                                    "(pt_inception-2015-12-05-6726825d.pth) or set $MUSE_INCEPTION_WEIGHTS, "
                                    "or --skip fid")
        inception = load_fid_inception(args.inception_weights, getattr(torch, settings.inception_dtype), args.device)
    lpips = build_lpips(args.lpips).to(args.device) if args.lpips else None
    model, cfg = load_from_args(args)
    pipeline = make_pipeline(settings.pipeline, cfg.model.image_size)
    bar = progress_bar(args.max_images, "reconstructing")
    try:
        batches = (torch.stack([pipeline(s["image"], None)[0] for s in batch])
                   for batch in batched(read_raw(shards), args.batch_size, args.max_images))
        metrics = ReconstructionMetrics(settings, inception, lpips, device=args.device)
        report = measure(model, batches, metrics, args.device, bar)
    finally:
        if bar is not None:
            bar.close()
    report.update(image_size=cfg.model.image_size, lpips_net=args.lpips)
    return report


def add_recon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-weights", default=os.environ.get("MUSE_INCEPTION_WEIGHTS"),
                        help="the FID Inception's pt_inception-2015-12-05-6726825d.pth (default: "
                             "$MUSE_INCEPTION_WEIGHTS)")
    parser.add_argument("--skip", action="append", choices=("fid",), default=[],
                        help="fid: no rFID nor Inception Score (no Inception weights needed)")
    parser.add_argument("--lpips", choices=("vgg", "alex", "squeeze"), help="also LPIPS with this backbone")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Reconstruction metrics: PSNR, SSIM, rFID, Inception Score")
    add_model_arguments(parser)
    parser.add_argument("--shards", required=True, help="shard pattern of evaluation images")
    parser.add_argument("--max-images", type=positive_int, help="default: every image in the shards")
    parser.add_argument("--batch-size", type=int, default=32)
    add_recon_arguments(parser)
    parser.add_argument("--out", required=True)
    add_protocol_arguments(parser, RECON)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings, deviations = resolve_protocol(args, RECON)
        report = run(args, settings)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        log.error("%s", err)
        return 2
    report.update(describe(args.protocol, settings, deviations), config=args.config, checkpoint=args.checkpoint,
                  official_checkpoint=args.official_checkpoint, shards=args.shards)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recon_metrics.json").write_text(json.dumps(report, indent=1))
    ssim_text = ", ".join(f"{k} {report[k]:.4f}" for k in ("ssim_data_range_1", "ssim_official_data_range_2")
                          if k in report)
    log.info("%d images (%s protocol%s): PSNR %.2f dB, %s%s%s%s", report["images"], args.protocol,
             ", modified" if deviations else "", report["psnr"], ssim_text,
             f", LPIPS {report['lpips']:.4f}" if "lpips" in report else "",
             f", rFID {report['rfid']:.3f}" if "rfid" in report else "",
             f", IS {report['inception_score']:.2f}" if "inception_score" in report else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
