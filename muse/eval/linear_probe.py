"""linear-probe: a linear classifier on frozen tokenizer features, top-1 (and top-5) accuracy.

    python -m muse.eval.linear_probe --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --train-shards 'imagenet-train-{000000..000127}.tar' --val-shards 'imagenet-val-*.tar' \\
        --feature semantic --cache feature_cache/ --out probe/

Shards need ``.cls`` labels. Features (mean-pooled ``latents`` or the ``semantic`` export) are computed
once and cached under ``--cache``; the classifier sees them standardized with the training set's
statistics and trains with AdamW on a cosine schedule.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from muse.eval.common import add_model_arguments
from muse.eval.features import KINDS, FeatureSet, cache_key, cached_features, extract_features
from muse.eval.probe import ProbeSettings, Standardize, fit

log = logging.getLogger("muse.eval")


def _check_labels(name: str, data: FeatureSet) -> None:
    missing = int((data.labels < 0).sum())
    if missing:
        raise ValueError(f"{name}: {missing} of {len(data.labels)} samples have no .cls label")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def linear_probe(train: FeatureSet, val: FeatureSet, settings: ProbeSettings = ProbeSettings(),
                 num_classes: int | None = None) -> tuple[dict, nn.Module]:
    """Train on ``train``'s pooled features, measure on ``val`` → (report, classifier)."""
    _check_labels("training set", train)
    _check_labels("validation set", val)
    if train.features.dim() != 2:
        raise ValueError(f"the linear probe reads pooled (M, C) features, got {tuple(train.features.shape)}")
    num_classes = num_classes or int(max(train.labels.max(), val.labels.max())) + 1
    torch.manual_seed(settings.seed)
    head = nn.Sequential(Standardize(train.features), nn.Linear(train.features.shape[1], num_classes))
    fit(head, train.features, train.labels, settings)
    with torch.no_grad():
        val_logits, train_logits = head(val.features), head(train.features)
    report = {"top1": topk_accuracy(val_logits, val.labels, 1), "train_top1": topk_accuracy(train_logits, train.labels, 1),
              "classes": num_classes, "train_samples": len(train.labels), "val_samples": len(val.labels),
              "feature_dim": train.features.shape[1], "settings": asdict(settings)}
    if num_classes >= 5:
        report["top5"] = topk_accuracy(val_logits, val.labels, 5)
    return report, head


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every feature-reading probe shares."""
    add_model_arguments(parser)
    parser.add_argument("--train-shards", required=True, help="shard pattern with labels")
    parser.add_argument("--val-shards", required=True, help="shard pattern with labels")
    parser.add_argument("--feature", choices=KINDS, default="semantic",
                        help="token features (latents, semantic) or the per-image ITC embedding (embeds)")
    parser.add_argument("--max-train", type=int, help="at most this many training images")
    parser.add_argument("--max-val", type=int, help="at most this many validation images")
    parser.add_argument("--batch-size", type=int, default=32, help="images per feature-extraction batch")
    parser.add_argument("--cache", help="folder for cached features (default: no cache)")
    parser.add_argument("--epochs", type=int, default=ProbeSettings.epochs)
    parser.add_argument("--lr", type=float, default=ProbeSettings.lr)
    parser.add_argument("--weight-decay", type=float, default=ProbeSettings.weight_decay)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)


def load_feature_sets(args, pooled: bool) -> tuple[FeatureSet, FeatureSet]:
    """The tokenizer of ``args`` and its features over the training and validation shards (cached)."""
    from muse.data import expand_shards
    from muse.eval.common import load_tokenizer, resolve_checkpoint

    train_shards, val_shards = expand_shards(args.train_shards), expand_shards(args.val_shards)
    model, _ = load_tokenizer(args.config, args.checkpoint, device=args.device)
    checkpoint = str(resolve_checkpoint(args.checkpoint)) if args.checkpoint else None
    sets = []
    for name, shards, limit in (("train", train_shards, args.max_train), ("val", val_shards, args.max_val)):
        key = cache_key(config=args.config, checkpoint=checkpoint, shards=shards, kind=args.feature,
                        pooled=pooled, limit=limit)
        sets.append(cached_features(args.cache, key, lambda: extract_features(
            model, shards, args.feature, pooled, args.batch_size, limit, args.device, desc=f"{name} features")))
    return sets[0], sets[1]


def save_probe(args, name: str, report: dict, head: nn.Module) -> Path:
    """``<name>.json`` (the report, with what was probed) and ``<name>_head.pt`` under ``args.out``."""
    report.update(feature=args.feature, config=args.config, checkpoint=args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    torch.save(head.state_dict(), out / f"{name}_head.pt")
    return out


def settings_from(args) -> ProbeSettings:
    return ProbeSettings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Linear probe on frozen MUSE features")
    add_feature_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train, val = load_feature_sets(args, pooled=True)
        report, head = linear_probe(train, val, settings_from(args))
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    save_probe(args, "linear_probe", report, head)
    log.info("linear probe (%s, %d classes): top-1 %.2f%%%s on %d images", args.feature, report["classes"],
             100 * report["top1"], f", top-5 {100 * report['top5']:.2f}%" if "top5" in report else "",
             report["val_samples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
