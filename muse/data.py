"""WebDataset shards: writing them (``muse-make-shards``) and reading them for training.

A sample is ``NNNNNN.jpg`` (image; ``.jpeg``, ``.png`` and ``.webp`` are read too), a caption
(``.txt``, ``.text``, ``.caption``, or a ``caption``/``text`` field of ``.json``), optionally ``.cls``
(class index) and ``.seg.png`` (segmentation labels). Training reads several sources, each through a
shuffle buffer, and draws every batch from one source chosen by the sampling ratios (as the official
loader does).

Determinism: the order of samples (shard order per epoch, shuffle buffer, source choice) comes from
seeded generators, and each sample's crop and flip from a generator seeded by (seed, part, sample
number), so a resumed run that skips the samples it already consumed, without decoding them, sees
exactly the same batches.

Damaged data never hangs a run and never kills it silently: an empty, truncated or garbage tar is
skipped with a warning naming it and counted; an undecodable sample is skipped and counted; a source
whose shards hold nothing readable, or that yields no decodable sample in ``max_bad_in_row``
attempts, stops the run with a :class:`DataError` naming its shards.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import os
import random
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger("muse.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Shard keys, in the official loader's order of preference.
IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
CAPTION_KEYS = ("txt", "text", "caption")
JSON_CAPTION_FIELDS = ("caption", "text")


class DataError(ValueError):
    """A data source cannot deliver samples (every shard empty or damaged, nothing decodable)."""


class ShardError(OSError):
    """One shard cannot be read (empty, truncated, not a tar)."""


# -------------------------------------------------------------------------------------------- writing

def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: identical inputs, identical shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples, out_dir: str | os.PathLike, samples_per_shard: int = 1000, prefix: str = "shard",
                 quality: int = 95) -> list[str]:
    """``samples``: iterable of dicts with ``image`` (PIL image or HxWx3 uint8 array), ``caption`` (str),
    optional ``cls`` (int >= 0) and ``seg`` (HxW uint8 label array or mode-"L" PIL image, the image's
    size). Returns the paths of the shards written, in order.

    A folder that already holds ``{prefix}-*.tar`` shards is refused: new shards would mix with stale
    ones. A shard is opened only for a sample it will hold, so no empty shard is ever written."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    stale = sorted(glob.glob(str(out_dir / f"{prefix}-*.tar")))
    if stale:
        raise FileExistsError(f"{out_dir} already holds {len(stale)} shard(s) ({Path(stale[0]).name}, ...): "
                              "new shards would mix with them; write into an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar = None
    try:
        for index, sample in enumerate(samples):
            record = _encode(sample, quality)
            if index % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(str(out_dir / f"{prefix}-{len(paths):06d}.tar"))
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            for suffix, data in record.items():
                _tar_member(tar, f"{index:06d}.{suffix}", data)
    finally:
        if tar is not None:
            tar.close()
    return paths


def _encode(sample: dict, quality: int) -> dict[str, bytes]:
    image = sample["image"]
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    record = {"jpg": buf.getvalue(), "txt": sample.get("caption", "").encode("utf-8")}
    if sample.get("cls") is not None:
        cls = int(sample["cls"])
        if cls < 0:
            raise ValueError(f"class index must be >= 0, got {cls}")
        record["cls"] = str(cls).encode()
    if sample.get("seg") is not None:
        record["seg.png"] = _label_png(sample["seg"], image.size)
    return record


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
    """A labels file: one ``filename<TAB>class index`` per line, indices >= 0."""
    labels = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, value = line.partition("\t")
        try:
            labels[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'filename<TAB>class index', got {line!r}") from None
        if labels[name.strip()] < 0:
            raise ValueError(f"{path}:{number}: class index must be >= 0, got {value.strip()!r}")
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


def _open_image(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()  # decode now: a damaged file is found here, not halfway through a shard
    return image


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
    parser.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder (deleted once the new shards are complete)")
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.per_shard < 1:
        log.error("--per-shard must be >= 1, got %d", args.per_shard)
        return 2
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        log.error("--out %s is not empty: new shards would mix with what is there. Choose an empty folder, or "
                  "pass --overwrite to replace it", out)
        return 2
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

    unreadable: list[str] = []

    def samples():
        for file in files:
            try:
                sample = {"image": _open_image(file), "caption": captions.get(file.name, ""), "cls": classes.get(file)}
                if args.seg_dir:
                    sample["seg"] = _open_image(Path(args.seg_dir) / f"{file.stem}.png")
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                unreadable.append(file.name)
                log.warning("skipped %s: cannot be read (%s: %s)", file, type(err).__name__, err)
                continue
            yield sample

    # Written next to --out and renamed into place: a crash leaves no half-written folder under its name.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shards = write_shards(samples(), staging, args.per_shard)
        if not shards:
            log.error("none of the %d images could be read: no shards written", len(files))
            return 2
        if class_names:
            (staging / "classes.txt").write_text("\n".join(class_names) + "\n")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote %d images into %d shards in %s%s%s", len(files) - len(unreadable), len(shards), out,
             f" ({len(class_names)} classes, names in classes.txt)" if class_names else "",
             f"; {len(unreadable)} unreadable image(s) skipped" if unreadable else "")
    return 0


# -------------------------------------------------------------------------------------------- reading

def _open_stream(shard: str):
    return wds.gopen(shard, "rb") if "://" in shard or shard.startswith("pipe:") else open(shard, "rb")


def read_shard(shard: str):
    """The records of one tar shard in order, as webdataset groups them: files ``dir/key.suffix`` with one
    key form a record ``{"__key__": "dir/key", "__url__": shard, suffix: bytes}`` (suffixes lower-cased).

    Raises :class:`ShardError` naming the shard when it is empty, truncated or not a tar; the records
    before the damage have been yielded by then (each complete)."""
    try:
        with _open_stream(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            record: dict = {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                key, dot, suffix = base.partition(".")
                if not dot or not key or base.startswith("._"):  # macOS resource forks, files without suffix
                    continue
                key = f"{folder}/{key}" if folder else key
                if record.get("__key__") != key:
                    if record:  # complete: yielded before the next file is read, which may be damaged
                        yield record
                    record = {"__key__": key, "__url__": shard}
                record[suffix.lower()] = tar.extractfile(member).read()
            if record:
                yield record
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"shard {shard} cannot be read ({type(err).__name__}: {err})") from None


def _caption(raw: dict, json_fields: tuple[str, ...] | None) -> str:
    """The caption: ``txt``/``text``/``caption`` first, then the JSON's ``caption``/``text`` (official
    order). ``json_fields`` (a source whose JSON holds several captions, e.g. long and short) names the
    JSON fields to take first."""
    def from_json(fields):
        if "json" not in raw:
            return ""
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            return ""
        if not isinstance(meta, dict):
            return ""
        return next((meta[f] for f in fields if isinstance(meta.get(f), str) and meta[f]), "")

    if json_fields:
        text = from_json(json_fields)
        if text:
            return text
    for key in CAPTION_KEYS:
        if key in raw:
            return raw[key].decode("utf-8") if isinstance(raw[key], bytes) else str(raw[key])
    return from_json(JSON_CAPTION_FIELDS)


def _decode(raw: dict, image_size: int, generator: torch.Generator, train: bool,
            json_fields: tuple[str, ...] | None = None) -> dict:
    """A raw shard record → {"image", "caption", "cls"} (+ "seg" when it has labels); raises on an
    undecodable image or a negative class."""
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    if key is None:
        raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) in the record; it has {sorted(raw)}")
    image = Image.open(io.BytesIO(raw[key]))
    image.load()
    cls = int(raw["cls"]) if "cls" in raw else -1
    if "cls" in raw and cls < 0:
        raise ValueError(f"class index must be >= 0, got {cls}")
    sample = {"caption": _caption(raw, json_fields), "cls": cls}
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
    """One data source: its shards, its sampling ratio, and (for JSON holding several captions) the
    JSON fields its caption is taken from first."""

    shards: list[str]
    ratio: float = 1.0
    json_caption_fields: tuple[str, ...] | None = None


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


def shuffle_buffer(items, size: int, initial: int, rng: random.Random):
    """Items in a random order drawn from a buffer of up to ``size`` (webdataset's ``shuffle``, seeded):
    the first item comes out once ``initial`` are buffered, then the buffer grows by one per item out
    until it holds ``size``. ``size <= 1``: the order is unchanged."""
    if size <= 1:
        yield from items
        return
    items, buffer = iter(items), []
    for item in items:
        buffer.append(item)
        if len(buffer) < size:
            extra = next(items, _END)
            if extra is not _END:
                buffer.append(extra)
        if len(buffer) < min(initial, size):
            continue
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()
    while buffer:
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


_END = object()


class _SourceReader:
    """The endless raw records of one source's shards for one part: shard order reshuffled every epoch,
    then a shuffle buffer. Damaged shards are skipped with a warning (once per shard) and counted; an
    epoch in which no shard yields a record stops the stream (nothing would ever come)."""

    def __init__(self, index: int, shards: list[str], seed: int, part: int, buffer: int, initial: int):
        self.index, self.shards, self.seed = index, shards, seed
        self.bad_shards: set[str] = set()
        self.records = shuffle_buffer(self._epochs(), buffer, initial, random.Random(_seed(seed, "shuffle", index, part)))

    def _epochs(self):
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(_seed(self.seed, self.index, epoch)).shuffle(order)
            found = 0
            for shard in order:
                try:
                    for record in read_shard(shard):
                        found += 1
                        yield record
                except ShardError as err:
                    if shard not in self.bad_shards:
                        self.bad_shards.add(shard)
                        log.warning("skipped the rest of a damaged shard: %s; %d bad shard(s) in source %d so far",
                                    err, len(self.bad_shards), self.index)
            if not found:
                names = ", ".join(order[:5]) + (", ..." if len(order) > 5 else "")
                raise DataError(f"data source {self.index} has nothing to read: none of its {len(order)} shard(s) "
                                f"({names}) holds a sample ({len(self.bad_shards)} damaged or not a tar, the "
                                "others empty)")
            epoch += 1


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of ``{"image", "caption", "cls"}`` samples from mixed sources.

    Shards are split across distributed ranks and data-loader workers (each a "part"). Each source is
    read through a shuffle buffer of ``shuffle_size`` samples (0: file order); each block of
    ``batch_size`` consecutive samples comes from one source, chosen by the ratios (so with the data
    loader's batch size every batch is from one source, as in the official loader).

    A sample that fails to decode is skipped, counted and logged, and replaced by the source's next;
    ``max_bad_in_row`` failures in a row from one source raise :class:`DataError` naming the shard.
    Every sample carries its ``position``: (part, state) with the part's source choices, samples
    consumed per source and counts so far. ``resume_positions`` ({part: state}, from the batches a
    resumed run already consumed) fast-forwards each part without decoding anything.

    A data loader takes whole batches from its workers in turn, always starting with worker 0; a run
    resumed after ``k`` batches needs part ``k mod workers`` first: ``worker_offset = k`` rotates the
    workers' parts so that the batch order continues exactly.
    """

    def __init__(self, sources: list[Source], image_size: int, seed: int = 0, train: bool = True,
                 rank: int = 0, world_size: int = 1, resume_positions: dict[int, dict] | None = None,
                 worker_offset: int = 0, batch_size: int = 1, shuffle_size: int = 0, shuffle_initial: int = 0,
                 max_bad_in_row: int = 1000):
        super().__init__()
        if not sources:
            raise ValueError("at least one data source is needed")
        for index, source in enumerate(sources):
            if not source.shards:
                raise ValueError(f"data source {index} has no shards")
            if not source.ratio > 0:
                raise ValueError(f"data source {index}: ratio must be > 0, got {source.ratio}")
        for name, value, low in (("batch_size", batch_size, 1), ("max_bad_in_row", max_bad_in_row, 1),
                                 ("shuffle_size", shuffle_size, 0), ("shuffle_initial", shuffle_initial, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.sources, self.image_size, self.seed, self.train = sources, image_size, seed, train
        self.rank, self.world_size, self.worker_offset = rank, world_size, worker_offset
        self.batch_size, self.shuffle_size, self.shuffle_initial = batch_size, shuffle_size, shuffle_initial
        self.max_bad_in_row = max_bad_in_row
        self.resume_positions = dict(resume_positions or {})
        self.skipped = 0  # samples this process's iterators skipped (a data loader's workers count their own)

    def _decode(self, raw: dict, source: Source, part: int, number: int) -> dict | None:
        try:
            generator = torch.Generator().manual_seed(_seed(self.seed, part, number))
            return _decode(raw, self.image_size, generator, self.train, source.json_caption_fields)
        except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
            self.skipped += 1
            if self.skipped <= 20 or self.skipped % 1000 == 0:
                log.warning("skipped undecodable sample %s of %s (%s: %s); %d skipped so far", raw.get("__key__"),
                            raw.get("__url__"), type(err).__name__, err, self.skipped)
            return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part, parts = self.rank * workers + (worker + self.worker_offset) % workers, self.world_size * workers
        readers = []
        for index, source in enumerate(self.sources):
            mine = source.shards[part::parts]
            if not mine:
                raise ValueError(f"source {index} has {len(source.shards)} shards, fewer than the "
                                 f"{parts} ranks × workers reading it")
            readers.append(_SourceReader(index, mine, self.seed, part, self.shuffle_size, self.shuffle_initial))
        ratios = [s.ratio for s in self.sources]
        chooser = random.Random(_seed(self.seed, "mix", part))
        state = self.resume_positions.get(part) or {}
        if not isinstance(state, dict):
            raise ValueError(f"resume position of part {part} is {state!r}, a sample count from an older version: "
                             "that checkpoint cannot resume its data stream exactly; start the run over")
        consumed = list(state.get("consumed", [0] * len(readers)))
        if len(consumed) != len(readers):
            raise ValueError(f"resume position of part {part} has {len(consumed)} sources, the data {len(readers)}")
        chosen, filled = state.get("chosen", 0), state.get("filled", 0)
        skipped = state.get("skipped", 0)
        # Replaying the choices and the raw records already consumed decodes nothing.
        source = None
        for _ in range(chosen):
            source = chooser.choices(range(len(readers)), weights=ratios)[0]
        for reader, count in zip(readers, consumed):
            for _ in range(count):
                next(reader.records)
        while True:
            if source is None or filled == self.batch_size:
                source = chooser.choices(range(len(readers)), weights=ratios)[0]
                chosen, filled = chosen + 1, 0
            reader, bad_in_row = readers[source], 0
            while True:
                raw = next(reader.records)
                consumed[source] += 1
                sample = self._decode(raw, self.sources[source], part, sum(consumed))
                if sample is not None:
                    break
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                if bad_in_row >= self.max_bad_in_row:
                    raise DataError(f"data source {source}: {bad_in_row} samples in a row could not be decoded "
                                    f"(the last one, {raw.get('__key__')}, in shard {raw.get('__url__')}); "
                                    "check the shards' image files")
            filled += 1
            sample["position"] = (part, {"chosen": chosen, "filled": filled, "consumed": list(consumed),
                                         "skipped": skipped, "bad_shards": sum(len(r.bad_shards) for r in readers)})
            yield sample


def read_once(shards: list[str], image_size: int):
    """One pass over ``shards`` in order, centre-cropped, for evaluation; undecodable samples and damaged
    shards are skipped with a warning."""
    for shard in shards:
        try:
            for raw in read_shard(shard):
                try:
                    sample = _decode(raw, image_size, torch.Generator(), train=False)
                except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                    log.warning("skipped undecodable sample %s of %s (%s)", raw.get("__key__"), shard, err)
                    continue
                yield {"key": raw["__key__"], **sample}
        except ShardError as err:
            log.warning("skipped the rest of a damaged shard: %s", err)


def batched(samples, batch_size: int, limit: int | None = None):
    """Lists of up to ``batch_size`` samples, at most ``limit`` samples in all (None: every one)."""
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"the number of images (--max-images) must be >= 1, or None for all, got {limit!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
    """A batch, with each part's stream state after its last sample here (what a checkpoint records)."""
    positions: dict[int, dict] = {}
    for s in samples:
        part, state = s["position"]
        if part not in positions or (state["chosen"], state["filled"]) > (positions[part]["chosen"],
                                                                           positions[part]["filled"]):
            positions[part] = state
    return {"images": torch.stack([s["image"] for s in samples]), "captions": [s["caption"] for s in samples],
            "cls": torch.tensor([s["cls"] for s in samples]), "positions": positions}


def stream_counts(positions: dict[int, dict]) -> dict[str, int]:
    """Skipped samples and bad shards over the parts of ``positions``."""
    return {"skipped_samples": sum(p.get("skipped", 0) for p in positions.values()),
            "bad_shards": sum(p.get("bad_shards", 0) for p in positions.values())}


if __name__ == "__main__":
    sys.exit(make_shards_main())
