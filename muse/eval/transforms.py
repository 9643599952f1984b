"""Reading evaluation shards, and the image pipelines of the evaluation protocols.

The official scripts use torchvision's ``Resize`` (shorter edge, PIL bicubic with antialiasing, the
longer edge *truncated*) and ``CenterCrop`` (offsets *rounded*, half to even); torchvision cannot be
installed here, so the same arithmetic is written out on PIL images. Pixels go to the tokenizer in
[-1, 1] (it applies the ImageNet normalization itself), which is the official normalized input up to
float rounding.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("muse.eval")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_KEYS = ("cls", "class", "label")
ADE_IGNORE = 255


def read_raw(shards: list[str]):
    """One pass over ``shards`` in order: ``{"key", "image" (PIL RGB), "cls" (-1 without one), "seg" (PIL
    or None)}``; a sample without an image, or whose image does not decode, is skipped with a warning."""
    import webdataset as wds

    for shard in shards:
        for raw in wds.WebDataset(shard, shardshuffle=False, empty_check=False, nodesplitter=lambda urls: urls,
                                  workersplitter=lambda urls: urls):
            key = raw.get("__key__")
            data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            if data is None:
                log.warning("skipped sample %s of %s: no image (%s)", key, shard, "/".join(IMAGE_KEYS))
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                seg = None
                if "seg.png" in raw:
                    seg = Image.open(io.BytesIO(raw["seg.png"]))
                    seg.load()
            except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                log.warning("skipped undecodable sample %s of %s (%s)", key, shard, err)
                continue
            label = next((raw[k] for k in LABEL_KEYS if k in raw), None)
            yield {"key": key, "image": image.convert("RGB"), "cls": -1 if label is None else int(label), "seg": seg}


def resize_shorter_edge(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: the shorter edge to ``size``, the longer one to
    ``int(size · long / short)``."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` of an image at least ``size`` on each side."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} out of a {width}x{height} image")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1] from 8-bit RGB."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def resize_crop(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """The official classification / reconstruction pipeline: Resize(resize, bicubic) + CenterCrop(crop)."""
    return to_pixels(center_crop(resize_shorter_edge(image, resize), crop))


def label_array(labels: Image.Image) -> torch.Tensor:
    """(H, W) uint8 class labels; an RGB-saved map keeps them in its first channel, as the official reads it."""
    array = np.asarray(labels)
    if array.ndim == 3:
        array = array[..., 0]
    return torch.from_numpy(array.astype(np.uint8))


def reduce_zero_label(labels: torch.Tensor) -> torch.Tensor:
    """ADE20K's 0 ("other") → ``ADE_IGNORE``, classes 1..150 → 0..149 (the official shift); a label
    already ``ADE_IGNORE`` stays ignored."""
    values = labels.long()
    ignored = (values == 0) | (values == ADE_IGNORE)
    return torch.where(ignored, ADE_IGNORE, values - 1).to(torch.uint8)


def stretch_pair(image: Image.Image, labels: Image.Image | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The official segmentation pipeline: the whole image stretched to ``size``² (bilinear, no
    antialiasing, on the tensor), its labels by nearest neighbour."""
    pixels = F.interpolate(to_pixels(image)[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    if labels is None:
        return pixels, None
    if labels.size != image.size:
        raise ValueError(f"segmentation labels are {labels.size}, the image {image.size}")
    resized = F.interpolate(label_array(labels)[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    return pixels, resized.to(torch.uint8)


def make_pipeline(kind: str, model_size: int, resize: int | None = None, crop: int | None = None,
                  labels: str = "raw"):
    """``(image, labels) → (pixels, labels or None)`` for a protocol: ``resize_crop`` (torchvision
    Resize(resize) + CenterCrop(crop), no labels), ``centre_crop`` (our training crop at ``crop``),
    ``stretch`` (to ``crop``²); ``crop`` and ``resize`` default to the model's image size. ``labels``:
    ``reduce_zero`` shifts ADE20K's labels as the official probe does."""
    from muse.data import preprocess_pair

    crop = crop or model_size
    resize = resize or crop
    if kind == "resize_crop":
        def pipeline(image, label_map):
            return resize_crop(image, resize, crop), None
    elif kind == "centre_crop":
        def pipeline(image, label_map):
            pixels, seg = preprocess_pair(image, label_map, crop, torch.Generator(), train=False)
            return pixels, None if seg is None else seg.to(torch.uint8)
    elif kind == "stretch":
        def pipeline(image, label_map):
            return stretch_pair(image, label_map, crop)
    else:
        raise ValueError(f"pipeline must be resize_crop, centre_crop or stretch, got {kind!r}")
    if labels == "raw":
        return pipeline
    if labels != "reduce_zero":
        raise ValueError(f"labels must be raw or reduce_zero, got {labels!r}")

    def shifted(image, label_map):
        pixels, seg = pipeline(image, label_map)
        return pixels, None if seg is None else reduce_zero_label(seg)
    return shifted


def round_to_8bit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → uint8 levels, rounded to nearest as the official evaluation does before every
    reconstruction metric."""
    return torch.round((images.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


def official_inception_levels(levels: torch.Tensor, source: str) -> torch.Tensor:
    """The uint8 images the official evaluator hands its Inception network, from exact 8-bit
    ``levels``: it rebuilds them from float32 tensors and casts with truncation, so some levels land one
    lower. ``source``: ``real`` (ToTensor's k / 255, ImageNet-normalized and back, × 255) or
    ``reconstruction`` (the rounded reconstruction (k − 127.5) / 127.5, then (x + 1) / 2 × 255)."""
    values = levels.to(torch.float32)
    if source == "real":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=levels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=levels.device).view(1, 3, 1, 1)
        unit = ((values / 255 - mean) / std) * std + mean
        return (unit * 255).to(torch.uint8)
    if source == "reconstruction":
        signed = (values - 127.5) / 127.5
        return ((signed + 1) / 2 * 255).to(torch.uint8)
    raise ValueError(f"source must be real or reconstruction, got {source!r}")
