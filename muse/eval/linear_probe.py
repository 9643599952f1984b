"""linear-probe: a linear classifier on frozen tokenizer features, top-1 (and top-5) accuracy.

    muse-eval linear-probe --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --train-shards 'imagenet-train-{000000..000127}.tar' --val-shards 'imagenet-val-*.tar' \\
        --cache feature_cache/ --out probe/

``--protocol official`` (default), ``scripts/linear_probe.py``: Resize 256 (bicubic) + CenterCrop 224,
the last block's v_itc mean-pooled and L2-normalized, an affine-free BatchNorm (eps 1e-6) and a
1000-way linear layer, SGD with Nesterov momentum 0.9, lr 0.1 on a per-epoch cosine, batch 4096, 100
epochs, validated every 5 epochs and at the last; the best validated top-1 is the result (the final
one is reported beside it). ``--protocol fast``: the training centre crop, standardized features,
AdamW 1e-3 on a per-step cosine, batch 256, the final top-1. Features are computed once and cached
under ``--cache``; the head trains on ``--device``. Shards need ``.cls`` labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from muse.eval.common import add_model_arguments
from muse.eval.features import KINDS, FeatureSet, cache_key, cached_features, extract_features
from muse.eval.probe import L2Normalize, Standardize, select_epoch, train_probe
from muse.eval.protocols import LINEAR_PROBE, add_protocol_arguments, describe, resolve_protocol

log = logging.getLogger("muse.eval")


def _check_labels(name: str, data: FeatureSet) -> None:
    missing = int((data.labels < 0).sum())
    if missing:
        raise ValueError(f"{name}: {missing} of {len(data.labels)} samples have no .cls label")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None].to(top.device)).any(dim=1).double().mean())


def build_classifier(settings, train_features: torch.Tensor, num_classes: int) -> nn.Module:
    """The probe on raw pooled features: [L2 normalization], then an affine-free BatchNorm or a frozen
    standardization, then the linear layer."""
    dim = train_features.shape[1]
    layers: list[nn.Module] = [L2Normalize()] if settings.l2_normalize else []
    if settings.head == "batchnorm":
        layers.append(nn.BatchNorm1d(dim, affine=False, eps=1e-6))
    elif settings.head == "standardize":
        seen = nn.functional.normalize(train_features, dim=-1) if settings.l2_normalize else train_features
        layers.append(Standardize(seen))
    else:
        raise ValueError(f"linear-probe head must be batchnorm or standardize, got {settings.head!r}")
    layers.append(nn.Linear(dim, num_classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def _logits(head: nn.Module, features: torch.Tensor, device, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([head(rows.to(device)).float().cpu() for rows in features.split(chunk)])


def linear_probe(train: FeatureSet, val: FeatureSet, settings=LINEAR_PROBE["official"],
                 device: str | torch.device = "cpu") -> tuple[dict, nn.Module]:
    """Train on ``train``'s pooled features, validate on ``val`` → (report, classifier)."""
    _check_labels("training set", train)
    _check_labels("validation set", val)
    if train.features.dim() != 2:
        raise ValueError(f"the linear probe reads pooled (M, C) features, got {tuple(train.features.shape)}")
    highest = int(max(train.labels.max(), val.labels.max()))
    num_classes = settings.num_classes or highest + 1
    if highest >= num_classes:
        raise ValueError(f"labels go up to {highest} but the probe has num_classes={num_classes}")
    torch.manual_seed(settings.seed)
    head = build_classifier(settings, train.features, num_classes).to(device)

    def evaluate(model):
        logits = _logits(model, val.features, device)
        scores = {"top1": topk_accuracy(logits, val.labels, 1)}
        if num_classes >= 5:
            scores["top5"] = topk_accuracy(logits, val.labels, 5)
        return scores

    history = train_probe(head, train.features, train.labels, settings, evaluate, metric="top1", device=device)
    reported = select_epoch(history, "top1", settings.select)
    final = select_epoch(history, "top1", "final")
    report = {"top1": reported["top1"], "epoch": reported["epoch"], "top1_final": final["top1"],
              "train_top1": topk_accuracy(_logits(head, train.features, device), train.labels, 1),
              "classes": num_classes, "train_samples": len(train.labels), "val_samples": len(val.labels),
              "feature_dim": train.features.shape[1],
              "history": [h for h in history if "top1" in h]}
    if "top5" in reported:
        report["top5"] = reported["top5"]
    return report, head


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every feature-reading probe shares."""
    add_model_arguments(parser)
    parser.add_argument("--train-shards", required=True, help="shard pattern with labels")
    parser.add_argument("--val-shards", required=True, help="shard pattern with labels")
    parser.add_argument("--max-train", type=int, help="at most this many training images")
    parser.add_argument("--max-val", type=int, help="at most this many validation images")
    parser.add_argument("--batch-size", type=int, default=32, help="images per feature-extraction batch")
    parser.add_argument("--cache", help="folder for cached features (default: no cache)")
    parser.add_argument("--out", required=True)


def load_feature_sets(args, settings, pooled: bool, pipeline,
                      pipeline_description: dict) -> tuple[FeatureSet, FeatureSet]:
    """The tokenizer of ``args`` and its ``settings.feature`` features over the training and validation
    shards (cached, keyed by everything that determines them)."""
    from muse.data import expand_shards
    from muse.eval.common import load_from_args, weights_identity

    if settings.feature not in KINDS:
        raise ValueError(f"--feature must be one of {KINDS}, got {settings.feature!r}")
    train_shards, val_shards = expand_shards(args.train_shards), expand_shards(args.val_shards)
    model, _ = load_from_args(args)
    checkpoint = weights_identity(args)
    sets = []
    for name, shards, limit in (("train", train_shards, args.max_train), ("val", val_shards, args.max_val)):
        key = cache_key(config=args.config, checkpoint=checkpoint, shards=shards, kind=settings.feature,
                        pooled=pooled, limit=limit, pipeline=pipeline_description)
        sets.append(cached_features(args.cache, key, lambda: extract_features(
            model, shards, settings.feature, pooled, args.batch_size, limit, args.device, desc=f"{name} features",
            pipeline=pipeline)))
    return sets[0], sets[1]


def save_probe(args, name: str, report: dict, head: nn.Module) -> Path:
    """``<name>.json`` (the report, with what was probed) and ``<name>_head.pt`` under ``args.out``."""
    report.update(config=args.config, checkpoint=args.checkpoint,
                  official_checkpoint=getattr(args, "official_checkpoint", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    torch.save(head.state_dict(), out / f"{name}_head.pt")
    return out


def run(args, settings) -> tuple[dict, nn.Module]:
    """Features and probe for parsed arguments and resolved settings (what ``main`` and ``table`` run)."""
    from muse.config import load_config
    from muse.eval.transforms import make_pipeline

    image_size = load_config(args.config).model.image_size
    pipeline = make_pipeline(settings.pipeline, image_size, settings.resize, settings.crop)
    description = {"pipeline": settings.pipeline, "resize": settings.resize, "crop": settings.crop or image_size}
    train, val = load_feature_sets(args, settings, True, pipeline, description)
    return linear_probe(train, val, settings, args.device)


def probe_main(argv, description: str, protocols: dict, run_probe, name: str, summary) -> int:
    """A probe's command line: parse, resolve the protocol, ``run_probe(args, settings)``, save the
    report and head under ``--out`` as ``name``, log ``summary(args, settings, deviations, report)``."""
    parser = argparse.ArgumentParser(description=description)
    add_feature_arguments(parser)
    add_protocol_arguments(parser, protocols)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings, deviations = resolve_protocol(args, protocols)
        report, head = run_probe(args, settings)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    report.update(describe(args.protocol, settings, deviations))
    save_probe(args, name, report, head)
    log.info("%s", summary(args, settings, deviations, report))
    return 0


def _summary(args, settings, deviations: dict, report: dict) -> str:
    return (f"linear probe ({args.protocol} protocol{', modified' if deviations else ''}, {settings.feature}, "
            f"{report['classes']} classes): top-1 {100 * report['top1']:.2f}% (epoch {report['epoch']}, "
            f"final {100 * report['top1_final']:.2f}%)"
            + (f", top-5 {100 * report['top5']:.2f}%" if "top5" in report else "")
            + f" on {report['val_samples']} images")


def main(argv=None) -> int:
    return probe_main(argv, "Linear probe on frozen MUSE features", LINEAR_PROBE, run, "linear_probe", _summary)

if __name__ == "__main__":
    sys.exit(main())
