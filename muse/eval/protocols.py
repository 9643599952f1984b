"""Evaluation protocols: ``official`` (the official MUSE scripts' settings, SPEC §7, the default) and
``fast`` (cheaper variants), as typed settings per tool.

Every setting is also a command-line option of its tool (``--epochs 5``); a value given there that
differs from the chosen protocol's is recorded as a deviation, so a result JSON always says which
protocol ran, with which settings, and what was changed from it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields

PROTOCOLS = ("official", "fast")


@dataclass(frozen=True)
class LinearProbeProtocol:
    """Official: ``scripts/linear_probe.py``. ``crop``/``resize`` None: the model's image size."""

    pipeline: str  # resize_crop (torchvision Resize + CenterCrop) or centre_crop (our training crop)
    resize: int | None
    crop: int | None
    feature: str
    l2_normalize: bool
    head: str  # batchnorm (affine-free BatchNorm1d, eps 1e-6) or standardize (training-set statistics)
    optimizer: str  # sgd or adamw
    nesterov: bool
    momentum: float
    lr: float
    weight_decay: float
    probe_batch_size: int
    epochs: int
    schedule: str  # cosine_per_epoch, cosine_per_step or constant
    eval_every: int  # validate every so many epochs and at the last; 0: at the last only
    select: str  # best (highest validated top-1) or final
    num_classes: int | None  # None: the highest label + 1
    seed: int = 0


LINEAR_PROBE = {
    "official": LinearProbeProtocol(pipeline="resize_crop", resize=256, crop=224, feature="semantic", l2_normalize=True,
                                    head="batchnorm", optimizer="sgd", nesterov=True, momentum=0.9, lr=0.1,
                                    weight_decay=0.0, probe_batch_size=4096, epochs=100, schedule="cosine_per_epoch",
                                    eval_every=5, select="best", num_classes=1000),
    "fast": LinearProbeProtocol(pipeline="centre_crop", resize=None, crop=None, feature="semantic", l2_normalize=False,
                                head="standardize", optimizer="adamw", nesterov=False, momentum=0.0, lr=1e-3,
                                weight_decay=0.0, probe_batch_size=256, epochs=100, schedule="cosine_per_step",
                                eval_every=0, select="final", num_classes=None),
}


@dataclass(frozen=True)
class SegProbeProtocol:
    """Official: ``scripts/segment_probe.py``: the image stretched to 512² (18×18 tokens for MUSE),
    the last block's output, BatchNorm2d + 1×1 conv, labels 0 → ignored and 1..150 → 0..149."""

    pipeline: str  # stretch (whole image to input_size², bilinear) or centre_crop
    input_size: int | None  # None: the model's image size
    labels: str  # reduce_zero (ADE20K: 0 ignored as 255, the rest shifted down) or raw
    ignore_index: int  # -1: none
    feature: str
    head: str  # bn_conv (BatchNorm2d + 1×1 conv, std 0.01) or standardize_linear
    optimizer: str
    nesterov: bool
    momentum: float
    lr: float
    weight_decay: float
    probe_batch_size: int
    drop_last: bool
    epochs: int
    schedule: str
    eval_every: int
    select: str
    miou_over: str  # all (every class, absent ones scoring 0) or present (classes in prediction or target)
    num_classes: int | None
    seed: int = 0


SEG_PROBE = {
    "official": SegProbeProtocol(pipeline="stretch", input_size=512, labels="reduce_zero", ignore_index=255,
                                 feature="hidden", head="bn_conv", optimizer="sgd", nesterov=False, momentum=0.9,
                                 lr=0.01, weight_decay=1e-4, probe_batch_size=8, drop_last=True, epochs=10,
                                 schedule="constant", eval_every=1, select="best", miou_over="all", num_classes=150),
    "fast": SegProbeProtocol(pipeline="centre_crop", input_size=None, labels="raw", ignore_index=0, feature="semantic",
                             head="standardize_linear", optimizer="adamw", nesterov=False, momentum=0.0, lr=1e-3,
                             weight_decay=0.0, probe_batch_size=16, drop_last=False, epochs=30,
                             schedule="cosine_per_step", eval_every=0, select="final", miou_over="present",
                             num_classes=None),
}


@dataclass(frozen=True)
class ZeroShotProtocol:
    """Official: ``scripts/zero_shot.py``. ``classes``/``templates``: a packaged list (``openai``:
    OpenAI's 1000 names and 80 templates; ``wordnet``: the first WordNet lemma from timm's lists;
    ``builtin``: 12 short templates) or a file, one per line."""

    pipeline: str
    resize: int | None
    crop: int | None
    classes: str
    templates: str
    # The official loader reads a label with ``cls or class or label``: class 0's images are dropped.
    drop_label_0: bool = False


ZERO_SHOT = {
    "official": ZeroShotProtocol(pipeline="resize_crop", resize=256, crop=224, classes="openai", templates="openai"),
    "fast": ZeroShotProtocol(pipeline="centre_crop", resize=None, crop=None, classes="wordnet", templates="builtin"),
}


@dataclass(frozen=True)
class ReconProtocol:
    """Official: ``scripts/evaluate.py`` / ``muse/evaluation/evaluator.py``: Resize(S) + CenterCrop(S)
    at the model's size, the reconstruction clamped and rounded to 8 bits, PSNR on [0, 1], SSIM by
    scikit-image (7×7 uniform) with data_range 2.0 — reported beside the correct data_range 1 —, and
    the FID Inception in float64 for rFID and the Inception Score (one split)."""

    pipeline: str
    round_8bit: bool
    # official_float: the Inception's uint8 input made as the official code does, by truncating float
    # round trips (some levels land one lower); exact: the 8-bit levels themselves.
    inception_input: str
    inception_dtype: str  # float64 or float32
    ssim_window: str  # uniform7 (scikit-image) or gaussian11


RECON = {
    "official": ReconProtocol(pipeline="resize_crop", round_8bit=True, inception_input="official_float",
                              inception_dtype="float64", ssim_window="uniform7"),
    "fast": ReconProtocol(pipeline="centre_crop", round_8bit=False, inception_input="exact", inception_dtype="float32",
                          ssim_window="gaussian11"),
}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _shown(value) -> str:
    return "auto" if value is None else str(value)  # None: the model's image size, or the labels' range


def add_protocol_arguments(parser: argparse.ArgumentParser, table: dict, skip: tuple[str, ...] = ()) -> None:
    """``--protocol`` and one option per setting of ``table``'s protocols (default: the protocol's)."""
    parser.add_argument("--protocol", choices=PROTOCOLS, default="official",
                        help="official (the official MUSE scripts' settings, default) or fast")
    group = parser.add_argument_group("protocol settings (default: the chosen protocol's)")
    official = table["official"]
    for field in fields(official):
        if field.name in skip:
            continue
        values = {getattr(p, field.name) for p in table.values()}
        sample = next((v for v in values if v is not None), None)
        kind = _parse_bool if isinstance(sample, bool) else type(sample)
        shown = ", ".join(f"{name}: {_shown(getattr(p, field.name))}" for name, p in table.items())
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind, default=None,
                           help=f"({shown})")


def resolve_protocol(args: argparse.Namespace, table: dict):
    """(the settings of ``args.protocol`` with the options given, {setting: value} that differ from it)."""
    base = table[args.protocol]
    changes = {f.name: getattr(args, f.name) for f in fields(base)
               if getattr(args, f.name, None) is not None and getattr(args, f.name) != getattr(base, f.name)}
    return dataclasses.replace(base, **changes), changes


def describe(protocol: str, settings, deviations: dict) -> dict:
    """What a result JSON records about how it was measured."""
    return {"protocol": protocol, "settings": dataclasses.asdict(settings), "deviations": deviations}
