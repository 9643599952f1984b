"""Frozen-tokenizer features over shards, for the probes, cached on disk.

A probe trains for many epochs on features that never change: they are computed once per (checkpoint,
config, shards, feature kind, image pipeline, image count) and reloaded from ``--cache`` afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("muse.eval")

KINDS = ("latents", "semantic", "embeds", "hidden")


@dataclass
class FeatureSet:
    features: torch.Tensor  # (M, C) pooled, or (M, h·w, C) per token
    labels: torch.Tensor  # (M,) class indices, -1 where a sample has none
    # (M, S, S) segmentation labels, when every sample has them; uint8 keeps 20k ADE20K maps at 512² in
    # 5 GB rather than 42.
    seg: torch.Tensor | None
    grid: tuple[int, int]
    keys: list[str]


def progress_bar(total: int | None, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


def _select(out, kind: str, pooled: bool) -> torch.Tensor:
    if kind == "embeds":
        return out.image_embeds
    tokens = {"latents": out.latents, "semantic": out.semantic, "hidden": out.hidden}[kind]
    return tokens.mean(dim=1) if pooled else tokens


@torch.no_grad()
def extract_features(model, shards: list[str], kind: str = "latents", pooled: bool = True,
                     batch_size: int = 32, max_images: int | None = None, device: str | torch.device = "cpu",
                     desc: str = "features", pipeline=None) -> FeatureSet:
    """One pass over ``shards``: the tokenizer's ``kind`` features (``latents``, the ``semantic`` export
    v_itc, the last block's output ``hidden``, mean-pooled over tokens when ``pooled``; or the ITC
    ``embeds``, one per image), with class and segmentation labels. ``pipeline(image, labels)`` →
    (pixels in [-1, 1], labels or None) makes the model's input (default: the centre crop at the
    model's image size, as in training)."""
    from muse.data import batched
    from muse.eval.transforms import make_pipeline, read_raw

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    pipeline = pipeline or make_pipeline("centre_crop", model.cfg.image_size)
    features, labels, segs, keys = [], [], [], []
    grid = (0, 0)
    bar = progress_bar(max_images, desc)
    for batch in batched(read_raw(shards), batch_size, max_images):
        pairs = [pipeline(s["image"], s["seg"]) for s in batch]
        out = model.features(torch.stack([pixels for pixels, _ in pairs]).to(device))
        features.append(_select(out, kind, pooled).float().cpu())
        grid = out.grid
        labels += [s["cls"] for s in batch]
        segs += [seg for _, seg in pairs]
        keys += [s["key"] for s in batch]
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not keys:
        raise FileNotFoundError(f"no decodable samples in {len(shards)} shard(s) starting with {shards[:1]}")
    seg = torch.stack(segs) if all(s is not None for s in segs) else None
    return FeatureSet(torch.cat(features), torch.tensor(labels), seg, grid, keys)


def cache_key(**parts) -> str:
    """A digest of what determines the features; files are identified by path, size and mtime."""
    def describe(value):
        if isinstance(value, (list, tuple)):
            return [describe(v) for v in value]
        if isinstance(value, str) and os.path.isfile(value):
            stat = os.stat(value)
            return [os.path.abspath(value), stat.st_size, stat.st_mtime_ns]
        return value

    text = json.dumps({k: describe(v) for k, v in sorted(parts.items())}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_features(cache_dir: str | os.PathLike | None, key: str, compute) -> FeatureSet:
    """``compute()``'s result, read from ``cache_dir/<key>.pt`` when there, written there (atomically)
    otherwise; no cache without a ``cache_dir``."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"features-{key}.pt"
    if path.exists():
        log.info("features from cache %s", path)
        return FeatureSet(**torch.load(path, weights_only=True))
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.tmp")
    torch.save(vars(result), partial)
    os.replace(partial, path)
    return result
