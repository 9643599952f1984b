"""seg-probe: a linear per-token segmentation head on frozen tokenizer features; mIoU and pixel accuracy.

    muse-eval seg-probe --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --train-shards 'ade-train-*.tar' --val-shards 'ade-val-*.tar' --cache cache/ --out seg/

Shards need ``.seg.png`` label maps. ``--protocol official`` (default), ``scripts/segment_probe.py``:
the whole image stretched to 512² (18×18 tokens for MUSE-1B), the last Synergistic block's output x
(512-d), BatchNorm2d + a 1×1 convolution (weights N(0, 0.01²)), logits upsampled bilinearly to the
labels; ADE20K's label 0 ignored and 1..150 shifted to 0..149; SGD lr 0.01, momentum 0.9, weight decay
1e-4, constant, batch 8 (last partial batch dropped), 10 epochs, validated every epoch; mIoU is the
mean IoU over all 150 classes (a class absent from prediction and labels scores 0), the best epoch's.
``--protocol fast``: the training centre crop, the ``semantic`` export, standardized features and a
linear layer, AdamW, 30 epochs, mIoU over the classes present, label 0 ignored.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from muse.eval.features import FeatureSet
from muse.eval.linear_probe import load_feature_sets, probe_main
from muse.eval.probe import Standardize, select_epoch, train_probe
from muse.eval.protocols import SEG_PROBE


class TokenSegmentationHead(nn.Module):
    """(B, h·w, C) token features → (B, classes, S, S) logits: ``bn_conv`` (the official
    BatchNorm2d + 1×1 conv on the (C, h, w) map) or ``standardize_linear`` (frozen training-set
    statistics and a linear layer per token)."""

    def __init__(self, kind: str, features: torch.Tensor, num_classes: int, grid: tuple[int, int], size: int):
        super().__init__()
        dim = features.shape[-1]
        self.kind, self.grid, self.size = kind, grid, size
        if kind == "bn_conv":
            self.bn = nn.BatchNorm2d(dim)
            self.head = nn.Conv2d(dim, num_classes, kernel_size=1)
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        elif kind == "standardize_linear":
            self.standardize = Standardize(features)
            self.linear = nn.Linear(dim, num_classes)
        else:
            raise ValueError(f"seg-probe head must be bn_conv or standardize_linear, got {kind!r}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        if count != self.grid[0] * self.grid[1]:
            raise ValueError(f"{count} tokens do not form the {self.grid[0]}x{self.grid[1]} grid")
        if self.kind == "bn_conv":
            grid = tokens.transpose(1, 2).reshape(batch, dim, *self.grid)
            logits = self.head(self.bn(grid))
        else:
            logits = self.linear(self.standardize(tokens)).transpose(1, 2).reshape(batch, -1, *self.grid)
        return F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows the labels, columns the predictions; pixels labelled
    ``ignore_index`` are left out."""
    target = target.long()
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    pred, true = prediction[keep].long(), target[keep]
    if true.numel() and (int(true.max()) >= num_classes or int(true.min()) < 0):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(true.min())}, {int(true.max())}]")
    return torch.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores_from_confusion(confusion: torch.Tensor, ignore_index: int | None = None, over: str = "present") -> dict:
    """Pixel accuracy and mean IoU, with the per-class IoU. ``over``: ``present`` averages the classes
    that occur in the prediction or the labels (an in-range ``ignore_index`` excluded); ``all``
    averages every class with the official I / (U + 1e-6), absent classes counting 0."""
    confusion = confusion.double()
    if confusion.sum() == 0:
        raise ValueError("no labelled pixels to score")
    num_classes = confusion.shape[0]
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    if over == "all":
        iou = intersection / (union + 1e-6)
        scored = torch.ones(num_classes, dtype=torch.bool)
    elif over == "present":
        iou = intersection / union.clamp_min(1)
        scored = union > 0
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            scored[ignore_index] = False
    else:
        raise ValueError(f"miou_over must be all or present, got {over!r}")
    return {"miou": float(iou[scored].mean()), "pixel_accuracy": float(intersection.sum() / confusion.sum()),
            "per_class_iou": {int(c): float(iou[c]) for c in scored.nonzero().flatten()}}


def segmentation_scores(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int | None = None, over: str = "present") -> dict:
    """``scores_from_confusion`` of one prediction against its labels."""
    return scores_from_confusion(confusion_matrix(prediction, target, num_classes, ignore_index), ignore_index, over)


def seg_probe(train: FeatureSet, val: FeatureSet, settings=SEG_PROBE["official"],
              device: str | torch.device = "cpu") -> tuple[dict, nn.Module]:
    """Train the head on ``train``'s per-token features and labels, score it on ``val``."""
    for name, data in (("training set", train), ("validation set", val)):
        if data.seg is None:
            raise ValueError(f"{name}: not every sample has a .seg.png label map")
        if data.features.dim() != 3:
            raise ValueError(f"{name}: the segmentation probe reads per-token (M, h·w, C) features")
    ignore_index = None if settings.ignore_index < 0 else settings.ignore_index
    labelled = torch.cat([train.seg.flatten(), val.seg.flatten()]).long()
    if ignore_index is not None:
        labelled = labelled[labelled != ignore_index]
    highest = int(labelled.max()) if labelled.numel() else 0
    num_classes = settings.num_classes or highest + 1
    if highest >= num_classes:
        raise ValueError(f"labels go up to {highest} but num_classes is {num_classes}")
    torch.manual_seed(settings.seed)
    head = TokenSegmentationHead(settings.head, train.features, num_classes, train.grid, train.seg.shape[-1]).to(device)

    def evaluate(model):
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        size = settings.probe_batch_size
        for tokens, labels in zip(val.features.split(size), val.seg.split(size)):
            prediction = model(tokens.to(device)).argmax(1).cpu()
            confusion += confusion_matrix(prediction, labels, num_classes, ignore_index)
        return scores_from_confusion(confusion, ignore_index, settings.miou_over)

    history = train_probe(head, train.features, train.seg, settings, evaluate, metric="miou",
                          ignore_index=-100 if ignore_index is None else ignore_index, device=device)
    reported = select_epoch(history, "miou", settings.select)
    report = {"miou": reported["miou"], "pixel_accuracy": reported["pixel_accuracy"], "epoch": reported["epoch"],
              "miou_final": select_epoch(history, "miou", "final")["miou"],
              "per_class_iou": reported["per_class_iou"], "classes": num_classes, "ignore_index": ignore_index,
              "grid": list(train.grid), "train_samples": len(train.seg), "val_samples": len(val.seg),
              "history": [{k: v for k, v in h.items() if k != "per_class_iou"} for h in history if "miou" in h]}
    return report, head


def run(args, settings) -> tuple[dict, nn.Module]:
    """Features and probe for parsed arguments and resolved settings (what ``main`` and ``table`` run)."""
    from muse.config import load_config
    from muse.eval.transforms import make_pipeline

    image_size = load_config(args.config).model.image_size
    pipeline = make_pipeline(settings.pipeline, image_size, crop=settings.input_size, labels=settings.labels)
    description = {"pipeline": settings.pipeline, "size": settings.input_size or image_size, "labels": settings.labels}
    train, val = load_feature_sets(args, settings, False, pipeline, description)
    return seg_probe(train, val, settings, args.device)


def _summary(args, settings, deviations: dict, report: dict) -> str:
    rows, cols = report["grid"]
    return (f"segmentation probe ({args.protocol} protocol{', modified' if deviations else ''}, {settings.feature}, "
            f"{report['classes']} classes, {rows}x{cols} tokens): mIoU {100 * report['miou']:.2f}% "
            f"(epoch {report['epoch']}), pixel accuracy {100 * report['pixel_accuracy']:.2f}% "
            f"on {report['val_samples']} images")


def main(argv=None) -> int:
    return probe_main(argv, "Linear segmentation probe on frozen MUSE token features", SEG_PROBE, run, "seg_probe",
                      _summary)

if __name__ == "__main__":
    sys.exit(main())
