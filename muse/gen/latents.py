"""Latent extraction: a trained tokenizer encodes image shards once into latent shards, so that training
the generator never runs the tokenizer.

    muse-encode-latents --config muse_1b/stage3 --official-checkpoint ckpt/MUSE-1B \\
        --shards 'shards/imagenet-train/*.tar' --out latents/imagenet-train
    torchrun --nproc_per_node=8 -m muse.gen.latents --config tiny/stage3 --checkpoint demo_out/stage3 ...

Input shard i becomes ``latents-<i>.pt`` (written atomically): ``latents`` (N, C, h, w), ``cls`` (N,)
(-1 without a label), ``captions`` and ``keys`` (lists), and the shard's per-channel float64 sums
(``count``, ``sum``, ``sum_sq``). Rank r of ``WORLD_SIZE`` (from the environment, as torchrun sets
them) encodes shards r, r + world, ...; a latent shard that exists is kept, so a rerun finishes an
interrupted extraction (one encoded with another tokenizer, checkpoint, size or input is refused).
Once every shard is there, ``stats.json`` holds the per-channel mean and
std over all latents (what the generator normalises with) and the source's settings.
Images are resized (shorter edge) and centre-cropped to the tokenizer's size (``--image-size``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger("muse.gen")

STATS_FILE = "stats.json"


def shard_name(index: int) -> str:
    return f"latents-{index:06d}.pt"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def encode_shard(model, shard: str, image_size: int, batch_size: int, device, dtype: torch.dtype,
                 autocast, progress=None) -> dict:
    """One image shard → its latent shard's contents (see the module docstring)."""
    from muse.data import batched, read_once

    latents, classes, captions, keys = [], [], [], []
    for batch in batched(read_once([shard], image_size), batch_size):
        images = torch.stack([s["image"] for s in batch]).to(device)
        with autocast:
            encoded = model.encode(images)
        latents.append(encoded.float().cpu())
        classes += [s["cls"] for s in batch]
        captions += [s["caption"] for s in batch]
        keys += [s["key"] for s in batch]
        if progress is not None:
            progress.update(len(batch))
    if not latents:
        raise ValueError(f"shard {shard} holds no decodable image")
    stacked = torch.cat(latents).double()
    return {"latents": torch.cat(latents).to(dtype), "cls": torch.tensor(classes, dtype=torch.long),
            "captions": captions, "keys": keys, "shard": shard, "count": stacked.shape[0] * stacked[0, 0].numel(),
            "sum": stacked.sum((0, 2, 3)), "sum_sq": (stacked ** 2).sum((0, 2, 3))}


def latent_shards(folder: str | os.PathLike) -> list[Path]:
    return sorted(Path(folder).glob("latents-*.pt"))


def compute_stats(folder: str | os.PathLike, expected: int | None = None, source: dict | None = None) -> dict:
    """Per-channel mean and std over every latent of ``folder``'s shards (from their sums), written to
    ``stats.json``; with ``expected``, only once that many shards are there (else None)."""
    folder = Path(folder)
    shards = latent_shards(folder)
    if expected is not None and len(shards) < expected:
        return None
    if not shards:
        raise FileNotFoundError(f"no latent shards (latents-*.pt) in {folder}")
    count, total, total_sq, samples, shape = 0, None, None, 0, None
    for path in shards:
        part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        count += part["count"]
        total = part["sum"] if total is None else total + part["sum"]
        total_sq = part["sum_sq"] if total_sq is None else total_sq + part["sum_sq"]
        samples += part["latents"].shape[0]
        if shape is None:
            shape = list(part["latents"].shape[1:])
        elif list(part["latents"].shape[1:]) != shape:
            raise ValueError(f"latent shard {path} holds {list(part['latents'].shape[1:])} latents, the others "
                             f"{shape}: shards of different tokenizers or sizes in one folder")
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(0).sqrt()
    stats = {"mean": mean.tolist(), "std": std.tolist(), "samples": samples, "shards": len(shards),
             "latent_shape": shape, **(source or {})}
    _atomic_write_text(json.dumps(stats, indent=1), folder / STATS_FILE)
    return stats


def load_stats(folder: str | os.PathLike) -> dict:
    path = Path(folder) / STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the latent extraction into {folder} is not complete "
                                "(run muse-encode-latents again to finish it)")
    return json.loads(path.read_text())


class LatentDataset:
    """Every latent shard of a folder, memory-mapped (ImageNet at 32 × 8 × 8 in fp32 is 10 GB)."""

    def __init__(self, folder: str | os.PathLike):
        shards = latent_shards(folder)
        if not shards:
            raise FileNotFoundError(f"data.latents: no latent shards (latents-*.pt) in {folder!r}; write them "
                                    "with muse-encode-latents")
        parts = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in shards]
        self.latents = [p["latents"] for p in parts]
        self.cls = torch.cat([p["cls"] for p in parts])
        self.offsets = torch.tensor([0] + [len(p["cls"]) for p in parts]).cumsum(0)
        self.stats = load_stats(folder)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w) float32, classes (B,)) of the samples at ``indices``."""
        part = torch.searchsorted(self.offsets, indices, right=True) - 1
        rows = [self.latents[p][i - self.offsets[p]] for p, i in zip(part.tolist(), indices.tolist())]
        return torch.stack(rows).float(), self.cls[indices]


def main(argv=None) -> int:
    from muse.eval.common import add_model_arguments, load_from_args

    parser = argparse.ArgumentParser(description="Encode image shards into latent shards for the generator")
    add_model_arguments(parser)
    parser.add_argument("--shards", required=True, help="image shard pattern (muse-make-shards' output)")
    parser.add_argument("--out", required=True, help="folder of latent shards and stats.json")
    parser.add_argument("--image-size", type=int, help="default: the tokenizer's model.image_size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="how the latents are stored (statistics are always taken in float64)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the tokenizer's autocast (auto: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from muse.data import expand_shards
    from muse.eval.features import progress_bar
    from muse.training.loop import autocast_for

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        shards = expand_shards(args.shards)
        model, cfg = load_from_args(argparse.Namespace(**{**vars(args), "device": str(device)}))
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    image_size = args.image_size or cfg.model.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    autocast, _ = autocast_for(args.precision, device)
    source = {"config": args.config, "checkpoint": args.checkpoint, "official_checkpoint": args.official_checkpoint,
              "image_size": image_size, "input_shards": args.shards}
    mine = [(i, s) for i, s in enumerate(shards) if i % world == rank]
    todo = [(i, s) for i, s in mine if not (out / shard_name(i)).exists()]
    for index, _ in mine:
        path = out / shard_name(index)
        if path.exists():
            kept = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("source")
            if kept != source:
                log.error("%s was encoded with %s, not %s: write into another --out, or delete the folder to "
                          "encode again", path, kept, source)
                return 2
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d shards are already encoded in %s", rank, len(mine) - len(todo), len(mine), out)
    bar = progress_bar(None, f"encoding (rank {rank}/{world})")
    try:
        for index, shard in todo:
            try:
                part = encode_shard(model, shard, image_size, args.batch_size, device, getattr(torch, args.dtype),
                                    autocast, bar)
            except ValueError as err:
                log.error("%s", err)
                return 2
            _atomic_save({**part, "source": source}, out / shard_name(index))
    finally:
        if bar is not None:
            bar.close()
    stats = compute_stats(out, expected=len(shards), source=source)
    if stats is None:
        log.info("rank %d done; stats.json follows once every rank has written its shards", rank)
    else:
        log.info("%d latents %s in %d shards; per-channel mean %.4g..%.4g, std %.4g..%.4g → %s", stats["samples"],
                 stats["latent_shape"], stats["shards"], min(stats["mean"]), max(stats["mean"]), min(stats["std"]),
                 max(stats["std"]), out / STATS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
