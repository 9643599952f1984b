"""recon-metrics: PSNR, SSIM, LPIPS and rFID of the tokenizer's reconstructions over eval shards.

    python -m muse.eval.recon_metrics --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --shards 'imagenet-val-{000000..000049}.tar' --inception-weights weights/pt_inception-2015-12-05.pth \\
        --out recon_metrics/

rFID: torchmetrics' ``FrechetInceptionDistance`` on torch-fidelity's InceptionV3 (the TF-ported FID
network), 2048-d pool features, weights from ``--inception-weights`` or ``$MUSE_INCEPTION_WEIGHTS``
(nothing is downloaded when a path is given); needs ``torch-fidelity``. LPIPS: torchmetrics'
``LearnedPerceptualImagePatchSimilarity`` (its linear heads ship with torchmetrics; the VGG/AlexNet
backbone comes from torchvision's weight cache, ``$TORCH_HOME/hub/checkpoints``). Either is left out
with ``--skip lpips`` / ``--skip fid``; a missing dependency is an error naming what to install.
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

from muse.eval.common import add_model_arguments
from muse.eval.metrics import psnr, ssim

log = logging.getLogger("muse.eval")


def build_fid(weights: str | None):
    """torchmetrics' FID on the standard InceptionV3 (2048-d) with weights from a local file."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("rFID needs torch-fidelity (`pip install torch-fidelity`), or pass --skip fid")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--inception-weights {weights!r}: no such file")
    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights)


def build_lpips(net: str):
    """torchmetrics' LPIPS with ImageNet backbone weights from torchvision's cache."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchmetrics.utilities.imports import _TORCHVISION_AVAILABLE

    if not _TORCHVISION_AVAILABLE:
        raise ModuleNotFoundError("LPIPS needs torchvision (its VGG/AlexNet backbone), or pass --skip lpips")
    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean", normalize=False)


class ReconstructionMetrics:
    """Running PSNR/SSIM (per image), LPIPS (mean) and rFID over batches of [-1, 1] images.

    ``lpips``: a torchmetrics-style metric (``update(recon, target)``, ``compute()``) on [-1, 1] images;
    ``fid``: one with ``update(images, real=bool)`` on [0, 1] images. Either may be None."""

    def __init__(self, lpips=None, fid=None):
        self.lpips, self.fid = lpips, fid
        self.psnr: list[float] = []
        self.ssim: list[float] = []

    @torch.no_grad()
    def update(self, reconstruction: torch.Tensor, target: torch.Tensor) -> None:
        if reconstruction.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
        self.psnr += psnr(reconstruction, target).tolist()
        self.ssim += ssim(reconstruction, target).tolist()
        if self.lpips is not None:
            self.lpips.update(reconstruction.float().clamp(-1, 1), target.float().clamp(-1, 1))
        if self.fid is not None:
            self.fid.update((target.float().clamp(-1, 1) + 1) / 2, real=True)
            self.fid.update((reconstruction.float().clamp(-1, 1) + 1) / 2, real=False)

    def compute(self) -> dict:
        if not self.psnr:
            raise ValueError("no images were measured")
        finite = [p for p in self.psnr if math.isfinite(p)]
        report = {"images": len(self.psnr), "psnr": sum(self.psnr) / len(self.psnr),
                  "psnr_finite_mean": sum(finite) / len(finite) if finite else None,
                  "ssim": sum(self.ssim) / len(self.ssim)}
        if self.lpips is not None:
            report["lpips"] = float(self.lpips.compute())
        if self.fid is not None:
            if len(self.psnr) < 2:
                raise ValueError("rFID needs at least 2 images")
            report["rfid"] = float(self.fid.compute())
        return report


@torch.no_grad()
def measure(model, batches, metrics: ReconstructionMetrics, device="cpu", progress=None) -> dict:
    """Reconstruct each batch of images and accumulate ``metrics``; returns ``metrics.compute()``."""
    for images in batches:
        images = images.to(device)
        metrics.update(model.decode(model.encode(images)), images)
        if progress is not None:
            progress.update(len(images))
    return metrics.compute()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Reconstruction metrics: PSNR, SSIM, LPIPS, rFID")
    add_model_arguments(parser)
    parser.add_argument("--shards", required=True, help="shard pattern of evaluation images")
    parser.add_argument("--max-images", type=int, help="default: every image in the shards")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inception-weights", default=os.environ.get("MUSE_INCEPTION_WEIGHTS"),
                        help="torch-fidelity's pt_inception-2015-12-05 weights file (default: $MUSE_INCEPTION_WEIGHTS)")
    parser.add_argument("--lpips-net", choices=("vgg", "alex", "squeeze"), default="vgg")
    parser.add_argument("--skip", action="append", choices=("lpips", "fid"), default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.data import expand_shards
    from muse.eval.common import load_tokenizer
    from muse.data import batched, read_once
    from muse.eval.features import progress_bar

    try:
        shards = expand_shards(args.shards)
        lpips = None if "lpips" in args.skip else build_lpips(args.lpips_net).to(args.device)
        fid = None if "fid" in args.skip else build_fid(args.inception_weights).to(args.device)
        model, cfg = load_tokenizer(args.config, args.checkpoint, device=args.device)
        bar = progress_bar(args.max_images, "reconstructing")
        try:
            batches = (torch.stack([s["image"] for s in batch]) for batch in
                       batched(read_once(shards, cfg.model.image_size), args.batch_size, args.max_images))
            report = measure(model, batches, ReconstructionMetrics(lpips, fid), args.device, bar)
        finally:
            if bar is not None:
                bar.close()
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        log.error("%s", err)
        return 2
    report.update(config=args.config, checkpoint=args.checkpoint, shards=args.shards,
                  lpips_net=None if lpips is None else args.lpips_net)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recon_metrics.json").write_text(json.dumps(report, indent=1))
    log.info("%d images: PSNR %.2f dB, SSIM %.4f%s%s", report["images"], report["psnr"], report["ssim"],
             f", LPIPS {report['lpips']:.4f}" if "lpips" in report else "",
             f", rFID {report['rfid']:.3f}" if "rfid" in report else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
