"""seg-probe: a linear per-token segmentation head on frozen tokenizer features; mIoU and pixel accuracy.

    python -m muse.eval.seg_probe --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --train-shards 'ade-train-*.tar' --val-shards 'ade-val-*.tar' --num-classes 151 --cache cache/ --out seg/

Shards need ``.seg.png`` label maps. Each token's feature goes through one linear layer to class
logits on the token grid, bilinearly upsampled to the label resolution. ADE20K's label 0 ("other") is
ignored by default (``--ignore-index``), so its 150 classes are scored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from muse.eval.features import FeatureSet
from muse.eval.linear_probe import add_feature_arguments, load_feature_sets, save_probe
from muse.eval.probe import ProbeSettings, Standardize, fit

log = logging.getLogger("muse.eval")


class TokenSegmentationHead(nn.Module):
    """(B, h·w, C) token features → (B, classes, S, S) logits."""

    def __init__(self, features: torch.Tensor, num_classes: int, grid: tuple[int, int], size: int):
        super().__init__()
        self.standardize = Standardize(features)
        self.linear = nn.Linear(features.shape[-1], num_classes)
        self.grid, self.size = grid, size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.linear(self.standardize(tokens)).transpose(1, 2)
        logits = logits.reshape(tokens.shape[0], -1, *self.grid)
        return F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)


def segmentation_scores(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int | None = None) -> dict:
    """Pixel accuracy and mean IoU over the classes that occur in the prediction or the target (pixels
    labelled ``ignore_index`` excluded), with the per-class IoU."""
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    pred, true = prediction[keep].long(), target[keep].long()
    if true.numel() == 0:
        raise ValueError("no labelled pixels to score")
    if int(true.max()) >= num_classes or int(true.min()) < 0:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(true.min())}, {int(true.max())}]")
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        present[ignore_index] = False
    iou = intersection / union.clamp_min(1)
    return {"miou": float(iou[present].mean()), "pixel_accuracy": float(intersection.sum() / confusion.sum()),
            "per_class_iou": {int(c): float(iou[c]) for c in present.nonzero().flatten()}}


def seg_probe(train: FeatureSet, val: FeatureSet, num_classes: int | None = None, ignore_index: int | None = 0,
              settings: ProbeSettings = ProbeSettings(epochs=30, batch_size=16)) -> tuple[dict, nn.Module]:
    """Train the head on ``train``'s per-token features and labels, score it on ``val``."""
    for name, data in (("training set", train), ("validation set", val)):
        if data.seg is None:
            raise ValueError(f"{name}: not every sample has a .seg.png label map")
        if data.features.dim() != 3:
            raise ValueError(f"{name}: the segmentation probe reads per-token (M, h·w, C) features")
    labelled = torch.cat([train.seg.flatten(), val.seg.flatten()])
    if ignore_index is not None:
        labelled = labelled[labelled != ignore_index]
    highest = int(labelled.max()) if labelled.numel() else 0
    num_classes = num_classes or highest + 1
    if highest >= num_classes:
        raise ValueError(f"labels go up to {highest} but num_classes is {num_classes}")
    torch.manual_seed(settings.seed)
    head = TokenSegmentationHead(train.features, num_classes, train.grid, train.seg.shape[-1])
    fit(head, train.features, train.seg, settings, ignore_index=-100 if ignore_index is None else ignore_index)
    with torch.no_grad():
        prediction = torch.cat([head(chunk).argmax(1) for chunk in val.features.split(settings.batch_size)])
    report = segmentation_scores(prediction, val.seg, num_classes, ignore_index)
    report.update(classes=num_classes, ignore_index=ignore_index, train_samples=len(train.seg),
                  val_samples=len(val.seg), settings=asdict(settings))
    return report, head


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Linear segmentation probe on frozen MUSE token features")
    add_feature_arguments(parser)
    parser.add_argument("--num-classes", type=int, help="default: the highest label + 1")
    parser.add_argument("--ignore-index", type=int, default=0, help="label excluded from training and scores "
                        "(ADE20K: 0); -1 for none")
    parser.set_defaults(epochs=30, lr=1e-3)
    parser.add_argument("--probe-batch-size", type=int, default=16, help="images per probe training step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = ProbeSettings(epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed)
    try:
        train, val = load_feature_sets(args, pooled=False)
        report, head = seg_probe(train, val, args.num_classes, None if args.ignore_index < 0 else args.ignore_index,
                                 settings)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    save_probe(args, "seg_probe", report, head)
    log.info("segmentation probe (%s, %d classes): mIoU %.2f%%, pixel accuracy %.2f%% on %d images", args.feature,
             report["classes"], 100 * report["miou"], 100 * report["pixel_accuracy"], report["val_samples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
