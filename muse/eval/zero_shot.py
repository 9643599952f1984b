"""zero-shot: classification by text, the ITC head's image embeddings against prompts of class names.

    python -m muse.eval.zero_shot --config muse_1b/stage3 --checkpoint runs/stage3 \\
        --shards 'imagenet-val-*.tar' --out zero_shot/ [--classes names.txt] [--templates templates.txt]

``--classes``: one class name per line, line i naming class i (the shards' ``.cls``); without it,
ImageNet-1k's names are read from timm's packaged class information (timm installed, not imported).
``--templates``: one prompt per line with ``{}`` where the class name goes; without it, a short
built-in set. Each class's embedding is the renormalized mean of its prompts' embeddings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from muse.eval.common import add_model_arguments
from muse.eval.features import extract_features
from muse.eval.linear_probe import topk_accuracy

log = logging.getLogger("muse.eval")

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a drawing of a {}.",
    "a cropped photo of the {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
)


def read_lines(path: str | Path, what: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def read_templates(path: str | Path | None) -> list[str]:
    templates = read_lines(path, "templates") if path else list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' for the class name; these have none: {bad[:3]}")
    return templates


def imagenet_class_names(timm_root: str | Path | None = None) -> list[str]:
    """ImageNet-1k's class names in class-index order: the first WordNet lemma of each synset, from the
    class lists timm ships (read as files; importing timm would import torchvision)."""
    if timm_root is None:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("no --classes file given and timm (whose ImageNet class list is the "
                                    "default) is not installed: pass --classes with one class name per line")
        timm_root = spec.submodule_search_locations[0]
    info = Path(timm_root) / "data" / "_info"
    synsets = read_lines(info / "imagenet_synsets.txt", "synsets")
    lemmas = dict(line.split("\t", 1) for line in read_lines(info / "imagenet_synset_to_lemma.txt", "lemmas"))
    return [lemmas[s].split(",")[0].strip() for s in synsets]


@torch.no_grad()
def class_embeddings(text_encoder, tokenize, class_names: list[str], templates: list[str],
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(classes, embed_dim): per class, the renormalized mean of its prompts' normalized embeddings."""
    rows = []
    for name in class_names:
        tokens = {k: v.to(device) for k, v in tokenize([t.format(name) for t in templates]).items()}
        rows.append(F.normalize(F.normalize(text_encoder(**tokens).float(), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def zero_shot_scores(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 accuracy of cosine-similarity classification."""
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} of {len(labels)} images have no .cls label")
    if (labels >= len(class_embeds)).any():
        raise ValueError(f"labels go up to {int(labels.max())} but there are {len(class_embeds)} class names")
    logits = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(class_embeds.float(), dim=-1).t()
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5),
            "images": len(labels), "classes": len(class_embeds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Zero-shot classification with the ITC head and text encoder")
    add_model_arguments(parser)
    parser.add_argument("--shards", required=True, help="shard pattern with .cls labels")
    parser.add_argument("--classes", help="class names, one per line (default: ImageNet-1k's)")
    parser.add_argument("--templates", help="prompt templates with '{}', one per line (default: built-in)")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.data import expand_shards
    from muse.eval.common import load_tokenizer
    from muse.models import ClipTextEncoder, build_tokenizer

    try:
        names = read_lines(args.classes, "class names") if args.classes else imagenet_class_names()
        templates = read_templates(args.templates)
        shards = expand_shards(args.shards)
        model, cfg = load_tokenizer(args.config, args.checkpoint, device=args.device)
        text_encoder = ClipTextEncoder(cfg.model.text).to(args.device)
        classes = class_embeddings(text_encoder, build_tokenizer(cfg.model.text), names, templates, args.device)
        images = extract_features(model, shards, "embeds", batch_size=args.batch_size, max_images=args.max_images,
                                  device=args.device, desc="images")
        report = zero_shot_scores(images.features, classes.cpu(), images.labels)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    report.update(templates=len(templates), config=args.config, checkpoint=args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_shot.json").write_text(json.dumps(report, indent=1))
    log.info("zero-shot over %d classes, %d templates: top-1 %.2f%%, top-5 %.2f%% on %d images", len(names),
             len(templates), 100 * report["top1"], 100 * report["top5"], report["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
