"""WebDataset shards: writing them (``muse-make-shards``) and reading them for training.

A sample is ``NNNNNN.jpg`` (image), ``NNNNNN.txt`` (caption), optionally ``.cls`` (class index) and
``.seg.png`` (segmentation labels). Training reads several sources mixed by sampling ratios.

Determinism: the order of samples (shard order per epoch, source choice) comes from seeded
generators, and each sample's crop and flip from a generator seeded by (seed, sample number), so a
resumed run that skips the samples it already consumed sees exactly the same batches.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger("muse.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# -------------------------------------------------------------------------------------------- writing

def write_shards(samples, out_dir: str | os.PathLike, samples_per_shard: int = 1000, prefix: str = "shard",
                 quality: int = 95) -> list[str]:
    """``samples``: iterable of dicts with ``image`` (PIL image or HxWx3 uint8 array), ``caption`` (str),
    optional ``cls`` (int) and ``seg`` (HxW uint8 label array or mode-"L" PIL image, the image's size).
    Returns the shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as sink:
        for index, sample in enumerate(samples):
            image = sample["image"]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=quality)
            record = {"__key__": f"{index:06d}", "jpg": buf.getvalue(), "txt": sample.get("caption", "")}
            if sample.get("cls") is not None:
                record["cls"] = str(int(sample["cls"]))
            if sample.get("seg") is not None:
                record["seg.png"] = _label_png(sample["seg"], image.size)
            sink.write(record)
    return sorted(glob.glob(str(out_dir / f"{prefix}-*.tar")))


def _label_png(labels, image_size: tuple[int, int]) -> bytes:
    labels = labels if isinstance(labels, Image.Image) else Image.fromarray(np.asarray(labels, dtype=np.uint8))
    if labels.mode == "P":  # palette images (VOC-style) store the label as the palette index
        labels = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    if labels.mode != "L":
        raise ValueError(f"segmentation labels must be 8-bit (mode 'L' or a uint8 array), got mode {labels.mode!r}")
    if labels.size != image_size:
        raise ValueError(f"segmentation labels are {labels.size[0]}x{labels.size[1]}, the image "
                         f"{image_size[0]}x{image_size[1]}")
    buf = io.BytesIO()
    labels.save(buf, format="PNG")  # lossless: labels must survive exactly
    return buf.getvalue()


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """A captions file: one ``filename<TAB>caption`` per line."""
    captions = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'filename<TAB>caption', got {line!r}")
        name, caption = line.split("\t", 1)
        captions[name.strip()] = caption.strip()
    return captions


def list_images(path: str | os.PathLike) -> list[Path]:
    """An image file, or the images of a folder (by suffix), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """A labels file: one ``filename<TAB>class index`` per line."""
    labels = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, value = line.partition("\t")
        try:
            labels[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'filename<TAB>class index', got {line!r}") from None
    return labels


def _labelled_files(args) -> tuple[list[Path], dict[Path, int], list[str]]:
    """The images, their class indices and the class names: from class subfolders (sorted, as in
    ImageNet's layout) or a labels file; none otherwise."""
    if args.class_folders:
        folders = sorted(p for p in Path(args.images).iterdir() if p.is_dir())
        files, classes = [], {}
        for index, folder in enumerate(folders):
            for file in list_images(folder):
                files.append(file)
                classes[file] = index
        return files, classes, [f.name for f in folders]
    files = list_images(args.images)
    if not args.labels:
        return files, {}, []
    by_name = read_labels(args.labels)
    missing = [f.name for f in files if f.name not in by_name]
    if missing:
        raise ValueError(f"{args.labels} has no label for {len(missing)} image(s), e.g. {missing[:3]}")
    return files, {f: by_name[f.name] for f in files}, []


def make_shards_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Turn an image folder (+ captions, labels, segmentation maps) "
                                                 "into WebDataset shards")
    parser.add_argument("--images", required=True, help="folder of images (or of class subfolders)")
    parser.add_argument("--captions", help="file of 'filename<TAB>caption' lines")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-folders", action="store_true",
                        help="--images holds one subfolder per class; classes are numbered in sorted order")
    labels.add_argument("--labels", help="file of 'filename<TAB>class index' lines")
    parser.add_argument("--seg-dir", help="folder of 8-bit label maps named like the images, .png (ADE20K layout)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files, classes, class_names = _labelled_files(args)
        captions = read_captions(args.captions) if args.captions else {}
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    if not files:
        log.error("no images (%s) in %s", ", ".join(IMAGE_SUFFIXES), args.images)
        return 2
    if args.seg_dir:
        missing = [f.name for f in files if not (Path(args.seg_dir) / f"{f.stem}.png").exists()]
        if missing:
            log.error("%s has no label map for %d image(s), e.g. %s", args.seg_dir, len(missing), missing[:3])
            return 2

    def samples():
        for file in files:
            sample = {"image": Image.open(file), "caption": captions.get(file.name, ""), "cls": classes.get(file)}
            if args.seg_dir:
                sample["seg"] = Image.open(Path(args.seg_dir) / f"{file.stem}.png")
            yield sample

    shards = write_shards(samples(), args.out, args.per_shard)
    if class_names:
        (Path(args.out) / "classes.txt").write_text("\n".join(class_names) + "\n")
    log.info("wrote %d images into %d shards in %s%s", len(files), len(shards), args.out,
             f" ({len(class_names)} classes, names in classes.txt)" if class_names else "")
    return 0


# -------------------------------------------------------------------------------------------- reading

def _whole(urls):
    return urls


def _open_shard(shard: str):
    # Shards are split across ranks and workers by the caller: webdataset's own splitters would split
    # a one-shard list again and leave the other workers empty.
    return wds.WebDataset(shard, shardshuffle=False, empty_check=False, nodesplitter=_whole, workersplitter=_whole)


def _decode(raw: dict, image_size: int, generator: torch.Generator, train: bool) -> dict:
    """A raw shard record → {"image", "caption", "cls"} (+ "seg" when it has labels); raises on an
    undecodable image."""
    image = Image.open(io.BytesIO(raw["jpg"]))
    image.load()
    caption = raw.get("txt", b"")
    sample = {"caption": caption.decode("utf-8") if isinstance(caption, bytes) else caption,
              "cls": int(raw["cls"]) if "cls" in raw else -1}
    if "seg.png" in raw:
        labels = Image.open(io.BytesIO(raw["seg.png"]))
        labels.load()
        sample["image"], sample["seg"] = preprocess_pair(image, labels, image_size, generator, train)
    else:
        sample["image"] = preprocess(image, image_size, generator, train)
    return sample


def _seed(*parts) -> int:
    """A stable 63-bit seed from its parts (Python's hash() of strings changes between processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF

@dataclass
class Source:
    shards: list[str]
    ratio: float = 1.0


def expand_shards(pattern: str) -> list[str]:
    """A glob, a brace pattern (``data-{000000..000099}.tar``) or a single path."""
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else list(wds.shardlists.expand_urls(pattern))
    missing = [p for p in paths if "://" not in p and not os.path.exists(p)]
    if not paths or missing:
        raise FileNotFoundError(f"no shards for {pattern!r}" + (f" (missing: {missing[:3]})" if missing else ""))
    return paths


def _crop_box(width: int, height: int, size: int, generator: torch.Generator, train: bool):
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if train:
        left = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
        top = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    return (new_w, new_h), (left, top, left + size, top + size)


def preprocess(image: Image.Image, size: int, generator: torch.Generator, train: bool = True) -> torch.Tensor:
    """Resize the shorter edge to ``size``, crop ``size``² (random in training, centre otherwise), flip
    half the time in training; (3, size, size) in [-1, 1]."""
    return preprocess_pair(image, None, size, generator, train)[0]


def preprocess_pair(image: Image.Image, labels: Image.Image | None, size: int, generator: torch.Generator,
                    train: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``preprocess`` of an image and, through the same resize (nearest: labels are not blended), crop
    and flip, of its segmentation labels → ((3, size, size) pixels, (size, size) int64 labels or None)."""
    image = image.convert("RGB")
    if labels is not None and labels.size != image.size:
        raise ValueError(f"segmentation labels are {labels.size}, the image {image.size}")
    new_size, box = _crop_box(*image.size, size, generator, train)
    image = image.resize(new_size, Image.BICUBIC).crop(box)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    label_map = None
    if labels is not None:
        label_map = torch.from_numpy(np.asarray(labels.resize(new_size, Image.NEAREST).crop(box), dtype=np.int64).copy())
    if train and bool(torch.rand((), generator=generator) < 0.5):
        pixels = pixels.flip(-1)
        label_map = label_map.flip(-1) if label_map is not None else None
    return pixels, label_map


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of ``{"image", "caption", "cls"}`` samples from mixed sources.

    Shards are split across distributed ranks and data-loader workers (each a "part"); a sample that
    fails to decode is skipped, counted (``skipped``) and logged, never fatal. Every sample carries its
    ``position`` (part, raw sample number); ``resume_positions`` ({part: number}, from the batches a
    resumed run already consumed) fast-forwards each part without decoding anything.

    A data loader takes whole batches from its workers in turn, always starting with worker 0; a run
    resumed after ``k`` batches needs part ``k mod workers`` first: ``worker_offset = k`` rotates the
    workers' parts so that the batch order continues exactly.
    """

    def __init__(self, sources: list[Source], image_size: int, seed: int = 0, train: bool = True,
                 rank: int = 0, world_size: int = 1, resume_positions: dict[int, int] | None = None,
                 worker_offset: int = 0):
        super().__init__()
        if not sources:
            raise ValueError("at least one data source is needed")
        self.sources, self.image_size, self.seed, self.train = sources, image_size, seed, train
        self.rank, self.world_size, self.worker_offset = rank, world_size, worker_offset
        self.resume_positions = dict(resume_positions or {})
        self.skipped = 0

    def _raw_samples(self, source_index: int, shards: list[str]):
        epoch = 0
        while True:
            order = list(shards)
            random.Random(_seed(self.seed, source_index, epoch)).shuffle(order)
            for shard in order:
                yield from _open_shard(shard)
            epoch += 1

    def _decode(self, raw: dict, part: int, number: int) -> dict | None:
        try:
            generator = torch.Generator().manual_seed(_seed(self.seed, part, number))
            return _decode(raw, self.image_size, generator, self.train) | {"position": (part, number)}
        except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
            self.skipped += 1
            log.warning("skipped undecodable sample %s (%s: %s); %d skipped so far",
                        raw.get("__key__"), type(err).__name__, err, self.skipped)
            return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part, parts = self.rank * workers + (worker + self.worker_offset) % workers, self.world_size * workers
        streams = []
        for index, source in enumerate(self.sources):
            mine = source.shards[part::parts]
            if not mine:
                raise ValueError(f"source {index} has {len(source.shards)} shards, fewer than the "
                                 f"{parts} ranks × workers reading it")
            streams.append(self._raw_samples(index, mine))
        ratios = [s.ratio for s in self.sources]
        chooser = random.Random(_seed(self.seed, "mix", part))
        resume_at = self.resume_positions.get(part, 0)
        number = 0
        while True:
            source = chooser.choices(range(len(streams)), weights=ratios)[0] if len(streams) > 1 else 0
            raw = next(streams[source])
            number += 1
            if number <= resume_at:
                continue
            sample = self._decode(raw, part, number)
            if sample is not None:
                yield sample


def read_once(shards: list[str], image_size: int):
    """One pass over ``shards`` in order, centre-cropped, for evaluation; undecodable samples skipped."""
    for shard in shards:
        for raw in _open_shard(shard):
            try:
                sample = _decode(raw, image_size, torch.Generator(), train=False)
            except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                log.warning("skipped undecodable sample %s (%s)", raw.get("__key__"), err)
                continue
            yield {"key": raw["__key__"], **sample}


def batched(samples, batch_size: int, limit: int | None = None):
    """Lists of up to ``batch_size`` samples, at most ``limit`` samples in all (None: every one)."""
    if limit is not None and limit <= 0:
        return
    batch, count = [], 0
    for sample in samples:
        batch.append(sample)
        count += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
        if count == limit:  # stop before decoding one sample more
            break
    if batch:
        yield batch


def collate(samples: list[dict]) -> dict:
    """A batch, with the furthest raw position it reached per part (what a checkpoint records)."""
    positions: dict[int, int] = {}
    for s in samples:
        part, number = s["position"]
        positions[part] = max(positions.get(part, 0), number)
    return {"images": torch.stack([s["image"] for s in samples]), "captions": [s["caption"] for s in samples],
            "cls": torch.tensor([s["cls"] for s in samples]), "positions": positions}


if __name__ == "__main__":
    sys.exit(make_shards_main())
