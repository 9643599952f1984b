"""zero-shot: classification by text, the ITC head's image embeddings against prompts of class names.

    muse-eval zero-shot --config muse_1b/stage3 --checkpoint runs/stage3 --shards 'imagenet-val-*.tar' --out zs/

``--protocol official`` (default), ``scripts/zero_shot.py``: Resize 256 (bicubic) + CenterCrop 224,
OpenAI's 1000 ImageNet class names and 80 prompt templates (packaged, ``muse/eval/data``) through the
config's CLIP text tower; each class's embedding is the renormalized mean of its prompts' normalized
embeddings. ``--protocol fast``: the training centre crop, 12 built-in templates and the first WordNet
lemma of each class (timm's class lists). ``--classes FILE`` / ``--templates FILE`` (one per line,
``{}`` where the class name goes) replace the lists. A randomly initialised text encoder makes the
accuracy meaningless: the tool refuses one unless ``--allow-random-text-encoder`` says so.
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

from muse.eval.common import add_model_arguments, add_text_arguments, positive_int, require_pretrained_text
from muse.eval.features import extract_features
from muse.eval.linear_probe import topk_accuracy
from muse.eval.protocols import ZERO_SHOT, add_protocol_arguments, describe, resolve_protocol

log = logging.getLogger("muse.eval")

DATA_DIR = Path(__file__).parent / "data"
OPENAI_CLASSES = DATA_DIR / "openai_imagenet_classes.txt"
OPENAI_TEMPLATES = DATA_DIR / "openai_imagenet_templates.txt"

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
    """The non-empty lines of a file, ``#`` comment lines (the packaged lists' headers) left out."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def read_templates(path: str | Path | None) -> list[str]:
    """Prompt templates from a file, the packaged ``openai`` 80, or (None, ``builtin``) the short set."""
    if path == "openai":
        path = OPENAI_TEMPLATES
    templates = read_lines(path, "templates") if path and path != "builtin" else list(DEFAULT_TEMPLATES)
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
def class_embeddings(text_encoder, tokenize, names: list[str], templates: list[str],
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(classes, embed_dim): per class, the renormalized mean of its prompts' normalized embeddings."""
    rows = []
    for name in names:
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


def class_names(source: str) -> list[str]:
    """``openai`` (the packaged list), ``wordnet`` (timm's lemmas) or a file of names."""
    if source == "openai":
        return read_lines(OPENAI_CLASSES, "class names")
    if source == "wordnet":
        return imagenet_class_names()
    return read_lines(source, "class names")


def run(args, settings) -> dict:
    """Zero-shot scores for parsed arguments and resolved settings (what ``main`` and ``table`` run)."""
    from muse.data import expand_shards
    from muse.eval.common import load_from_args
    from muse.eval.transforms import make_pipeline
    from muse.models import ClipTextEncoder, build_tokenizer

    names = class_names(settings.classes)
    templates = read_templates(settings.templates)
    shards = expand_shards(args.shards)
    model, cfg = load_from_args(args)
    require_pretrained_text(cfg, args.allow_random_text_encoder, "zero-shot")
    text_encoder = ClipTextEncoder(cfg.model.text).to(args.device)
    classes = class_embeddings(text_encoder, build_tokenizer(cfg.model.text), names, templates, args.device)
    pipeline = make_pipeline(settings.pipeline, cfg.model.image_size, settings.resize, settings.crop)
    images = extract_features(model, shards, "embeds", batch_size=args.batch_size, max_images=args.max_images,
                              device=args.device, desc="images", pipeline=pipeline)
    embeds, labels = images.features, images.labels
    dropped = 0
    if settings.drop_label_0:
        keep = labels != 0
        embeds, labels, dropped = embeds[keep], labels[keep], int((~keep).sum())
    report = zero_shot_scores(embeds, classes.cpu(), labels)
    report.update(templates=len(templates), distinct_class_names=len(set(names)), dropped_label_0=dropped)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Zero-shot classification with the ITC head and text encoder")
    add_model_arguments(parser)
    add_text_arguments(parser)
    parser.add_argument("--shards", required=True, help="shard pattern with .cls labels")
    parser.add_argument("--max-images", type=positive_int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    add_protocol_arguments(parser, ZERO_SHOT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings, deviations = resolve_protocol(args, ZERO_SHOT)
        report = run(args, settings)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    report.update(describe(args.protocol, settings, deviations), config=args.config, checkpoint=args.checkpoint,
                  official_checkpoint=args.official_checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_shot.json").write_text(json.dumps(report, indent=1))
    log.info("zero-shot (%s protocol%s) over %d classes, %d templates: top-1 %.2f%%, top-5 %.2f%% on %d images",
             args.protocol, ", modified" if deviations else "", report["classes"], report["templates"],
             100 * report["top1"], 100 * report["top5"], report["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
