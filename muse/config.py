"""Typed configuration: dataclasses loaded from YAML, with ``key.sub=value`` overrides.

Unknown keys are rejected with the list of valid ones; values are converted to the field's type.
Shipped configs live in ``muse/configs/*.yaml`` and are named by path without the suffix
(``"tiny"``, ``"muse_1b"``). Paths to local checkpoints come from environment variables
(``${MUSE_INTERNVIT_PATH}``) so that no config names a hub.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def _require(section: str, config, positive=(), non_negative=()) -> None:
    """Counts and sizes that must be > 0 (``positive``) or >= 0 (``non_negative``); list fields are
    checked element by element. A bad one is a config error naming the key, not a failure deep in torch."""
    for names, allowed, wanted in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(config, name)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and not allowed(v) for v in values):
                raise ValueError(f"{section}.{name} must be {wanted}{' (each entry)' if isinstance(value, list) else ''}, "
                                 f"got {value!r}")


def _pretrained_path() -> str | None:
    # An unset ${VAR} in this field is a config error naming the variable (see _build).
    return field(default=None, metadata={"env_required": True})


def _check_source(section: str, pretrained: str | None, random_init: bool) -> None:
    if pretrained and random_init:
        raise ValueError(f"{section}: pretrained={pretrained!r} and random_init=true contradict each other; "
                         f"set one of them")


@dataclass
class EncoderConfig:
    """InternViT (``InternVLVisionModel``). ``pretrained``: a local InternVL3 folder (remote-code,
    ``-hf`` or bare vision model); ``random_init: true`` builds it randomly from the sizes below
    instead. With neither, building the model is an error. ``image_size`` is the resolution its
    position embeddings were trained at (InternViT: 448); other inputs interpolate them."""

    pretrained: str | None = _pretrained_path()
    random_init: bool = False
    image_size: int = 448
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14

    def __post_init__(self):
        _check_source("model.encoder", self.pretrained, self.random_init)
        _require("model.encoder", self, positive=("image_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size"))


@dataclass
class TeacherConfig:
    """The frozen teacher whose attention supervises the maps. ``kind: dinov3`` (official): DINOv3 ViT
    (``DINOv3ViTModel``), its last layer's head-mean attention. ``kind: structural``: maps computed
    from the image (colour, texture and position affinities at the patch grid, widths ``*_sigma``),
    for configs without DINOv3 weights; it has no weights (``pretrained``/``random_init`` unused)."""

    kind: str = "dinov3"
    # "muse": every layer on our attention kernels, the last one writing only its head-mean map (one map
    # write instead of every layer's per-head maps); "eager": output_attentions in every layer (the
    # official code's way, for comparison and benchmarks).
    attention: str = "muse"
    pretrained: str | None = _pretrained_path()
    random_init: bool = False
    # Set on the demo's photos: rows well above uniform (peak ≥ 2.4× uniform at the centre query,
    # mean entropy 3.1 of log 64 = 4.2 nats) yet broad enough for a small student to follow.
    colour_sigma: float = 0.2
    texture_sigma: float = 0.2
    distance_sigma: float = 0.4
    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    intermediate_size: int = 5120
    patch_size: int = 16
    num_register_tokens: int = 4

    def __post_init__(self):
        if self.kind not in ("dinov3", "structural"):
            raise ValueError(f"model.teacher.kind must be 'dinov3' or 'structural', got {self.kind!r}")
        if self.attention not in ("muse", "eager"):
            raise ValueError(f"model.teacher.attention must be 'muse' or 'eager', got {self.attention!r}")
        _check_source("model.teacher", self.pretrained, self.random_init)
        _require("model.teacher", self, positive=("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "colour_sigma", "texture_sigma", "distance_sigma"),
                 non_negative=("num_register_tokens",))


@dataclass
class DecoderConfig:
    """DC-AE decoder (diffusers ``AutoencoderDC``); ``pretrained`` is a local AutoencoderDC folder.
    ``latent_channels``: the randomly built decoder's input channels (a pretrained one has its own);
    a 1×1 ``decoder_adapter`` maps ``model.latent_channels`` to them when the two differ."""

    pretrained: str | None = _pretrained_path()
    random_init: bool = False
    latent_channels: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    layers_per_block: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 3, 3])
    block_types: list[str] = field(default_factory=lambda: ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock",
                                                            "EfficientViTBlock", "EfficientViTBlock"])
    qkv_multiscales: list[list[int]] = field(default_factory=lambda: [[], [], [], [5], [5], [5]])
    attention_head_dim: int = 32

    def __post_init__(self):
        _check_source("model.decoder", self.pretrained, self.random_init)
        _require("model.decoder", self, positive=("latent_channels", "block_out_channels", "attention_head_dim"),
                 non_negative=("layers_per_block",))


@dataclass
class TextConfig:
    """Frozen CLIP text encoder (``CLIPTextModelWithProjection``); ``embed_dim`` is its projection width.
    ``tokenizer``: a local CLIP tokenizer folder, by default ``pretrained`` itself (a CLIP folder holds
    both). A randomly initialised encoder (``random_init: true``) is built from ``seed``, so its
    embeddings repeat from run to run, and reads a hashing word tokenizer (no vocabulary exists)."""

    pretrained: str | None = _pretrained_path()
    random_init: bool = False
    seed: int = 0
    tokenizer: str | None = _pretrained_path()
    max_length: int = 77
    embed_dim: int = 768
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    vocab_size: int = 49408

    def __post_init__(self):
        _check_source("model.text", self.pretrained, self.random_init)
        _require("model.text", self, positive=("max_length", "embed_dim", "hidden_size", "num_layers", "num_heads",
                                               "vocab_size"))


@dataclass
class ModelConfig:
    image_size: int = 224
    dim: int = 512
    num_heads: int = 8
    num_blocks: int = 6
    latent_channels: int = 32
    # "last" (official code) or "all" (the paper's equation) blocks receive the topology loss.
    supervise: str = "last"
    topo_reduction: str = "head_mean"
    # Fused loss (no maps in memory) or maps materialized and the KL taken on them, for comparison.
    fused_topology: bool = True
    grad_scale: float = 0.5
    # The training target's layout: "ours" (rows index queries, renormalized over keys) or "official"
    # (the official Ψ's transposed map, renormalized over queries; reproduces official training).
    teacher_layout: str = "ours"
    # Images must be floating point in [-1, 1]: checked once per batch (one min/max and a host wait);
    # off where the data is known to be (a captured CUDA graph, the training pipeline's own batches).
    check_inputs: bool = True
    logit_scale_init: float = 2.6592
    backend: str = "auto"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self):
        if self.supervise not in ("last", "all"):
            raise ValueError(f"model.supervise must be 'last' or 'all', got {self.supervise!r}")
        if self.topo_reduction not in ("head_mean", "per_head"):
            raise ValueError(f"model.topo_reduction must be 'head_mean' or 'per_head', got {self.topo_reduction!r}")
        _require("model", self, positive=("image_size", "dim", "num_heads", "num_blocks", "latent_channels"),
                 non_negative=("grad_scale",))
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if self.teacher_layout not in ("ours", "official"):
            raise ValueError(f"model.teacher_layout must be 'ours' or 'official', got {self.teacher_layout!r}")
        if self.backend not in ("auto", "triton", "torch", "cuda"):
            raise ValueError(f"model.backend must be auto, triton, torch or cuda, got {self.backend!r}")


@dataclass
class DataConfig:
    """WebDataset sources: one shard pattern per source; each batch is drawn from one source chosen by
    ``ratios`` (equal by default), each source read through a shuffle buffer (official: 5000 samples,
    the first out once 1000 are in). ``json_caption_fields``: per source, the JSON fields its caption
    is taken from first (a JSON holding long and short captions); None: the official order.
    ``max_bad_in_row``: undecodable samples in a row after which a source stops the run."""

    shards: list[str] = field(default_factory=list)
    ratios: list[float] | None = None
    batch_size: int = 32
    num_workers: int = 4
    shuffle_buffer: int = 5000
    shuffle_initial: int = 1000
    json_caption_fields: list[list[str]] | None = None
    max_bad_in_row: int = 1000

    def __post_init__(self):
        _require("data", self, positive=("batch_size", "max_bad_in_row"),
                 non_negative=("num_workers", "shuffle_buffer", "shuffle_initial"))
        if self.ratios is not None and len(self.ratios) != len(self.shards):
            raise ValueError(f"data.ratios has {len(self.ratios)} entries for {len(self.shards)} data.shards")
        if self.ratios is not None and not all(r > 0 for r in self.ratios):
            raise ValueError(f"data.ratios must all be > 0, got {self.ratios}")
        if self.json_caption_fields is not None and len(self.json_caption_fields) != len(self.shards):
            raise ValueError(f"data.json_caption_fields has {len(self.json_caption_fields)} entries for "
                             f"{len(self.shards)} data.shards")


@dataclass
class OptimConfig:
    """AdamW for the tokenizer and the discriminator, official values (SPEC §7 "Recipe").

    No weight decay on tensors of fewer than two dimensions nor on parameters whose name contains one
    of ``no_decay_keywords``. The discriminator's ``disc_*`` values left unset (None) follow the
    official code: the generator's weight decay, warm-up and clipping, and an end LR of
    ``disc_lr · end_lr / lr`` (its scheduler reuses the generator's LR ratio)."""

    lr: float = 4e-4
    end_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 1e-4
    no_decay_keywords: list[str] = field(default_factory=lambda: ["ln", "bias", "latent_tokens", "mask_token",
                                                                  "embedding", "norm", "gamma"])
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    backbone_lr_scale: float = 1.0
    disc_lr: float = 1e-4
    disc_weight_decay: float | None = None
    disc_warmup_steps: int | None = None
    disc_end_lr: float | None = None
    disc_grad_clip: float | None = None

    def __post_init__(self):
        _require("optim", self, positive=("lr", "grad_clip", "disc_lr", "disc_grad_clip"),
                 non_negative=("end_lr", "warmup_steps", "weight_decay", "backbone_lr_scale", "disc_weight_decay",
                               "disc_warmup_steps", "disc_end_lr"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class LossWeights:
    """Weights of the generator-side terms (a 0 weight skips the term); official stage-1 values."""

    reconstruction: float = 1.0
    perceptual: float = 1.1
    topology: float = 2.0
    itc: float = 0.0
    gan: float = 0.0
    lecam: float = 0.0


@dataclass
class LossConfig(LossWeights):
    """The official loss recipe (SPEC §7). Perceptual: (lpips_weight·LPIPS + convnext_weight·MSE of
    ConvNeXt-S logits at ``convnext_resolution``²) / (lpips_weight + convnext_weight). Weight files are
    local: ``vgg16_weights`` / ``convnext_weights`` are torchvision state dicts (``vgg16-397923af.pth``,
    ``convnext_small-0c510722.pth``; without them the backbone is random, with a warning), and
    ``lpips_heads`` the published LPIPS heads (default: the copy inside torchmetrics or lpips).
    Discriminator: the official blur PatchGAN's sizes, LeCam's EMA decay, ``disc_factor`` (the official
    ``discriminator_factor``, on both GAN losses) and ``disc_init``, an official run's loss-module state
    dict (or a bare discriminator state dict) to start from."""

    reconstruction_kind: str = "l2"
    disc_start: int = 0
    disc_factor: float = 1.0
    lecam_decay: float = 0.999
    lpips_weight: float = 1.0
    convnext_weight: float = 0.1
    convnext_resolution: int = 224
    lpips_heads: str | None = None
    vgg16_weights: str | None = _pretrained_path()
    convnext_weights: str | None = _pretrained_path()
    disc_channels: int = 128
    disc_stages: int = 3
    disc_blur: bool = True
    disc_blur_kernel_size: int = 4
    disc_pool_size: int = 16
    disc_init: str | None = None

    def __post_init__(self):
        _require("loss", self, positive=("convnext_resolution", "disc_channels", "disc_stages", "disc_blur_kernel_size",
                                         "disc_pool_size"),
                 non_negative=("reconstruction", "perceptual", "topology", "itc", "gan", "lecam", "disc_start",
                               "disc_factor", "lpips_weight", "convnext_weight"))


@dataclass
class LoopConfig:
    """What the training loop (``muse.training.loop``) reads, shared by the tokenizer's and the
    generator's ``train`` sections; each sets its own defaults."""

    steps: int = 50000
    out_dir: str = "runs/muse"
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    # Official EMA: decay min(ema_decay, (1 + k)/(10 + k)) at update k + 1 (0 at the first);
    # ema_warmup=false applies ema_decay from the first update.
    ema_decay: float = 0.999
    ema_warmup: bool = True
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3
    max_bad_steps: int = 10
    # TensorBoard scalars beside log.jsonl when tensorboard is installed.
    tensorboard: bool = True

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        _require("train", self, positive=("steps", "log_every", "ckpt_every"),
                 non_negative=("keep_last", "max_bad_steps"))
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {self.ema_decay}")


@dataclass
class TrainConfig(LoopConfig):
    stage: int = 1
    # The previous stage's checkpoint: its EMA weights initialise this stage.
    init_weight: str | None = None
    # Reconstruction and student-vs-teacher attention PNGs, and the gradient-orthogonality cosines,
    # every so many steps (0: never).
    image_every: int = 1000
    ortho_every: int = 1000

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"train.stage must be 1, 2 or 3, got {self.stage}")
        super().__post_init__()
        _require("train", self, non_negative=("image_every", "ortho_every"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_ENV = re.compile(r"\$\{(\w+)\}")
# The top-level sections whose unset checkpoint variables are errors (None: all), for one load_config.
_ENV_SECTIONS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("env_sections", default=None)


def _expand_env(value):
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), ""), value)
    return value


def _convert(tp, value, where: str):
    """Convert a YAML (or command-line string) value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        value = _expand_env(value)
        # An unset ${VAR} leaves an optional path empty: None, i.e. "build randomly".
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("", "none", "null"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be a bool, got {value!r}")
    if tp in (int, float):
        try:
            converted = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != converted:
            raise ValueError(f"{where} must be int, got {value!r}")
        return converted
    if tp is str:
        return _expand_env(str(value))
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
                         f"valid keys{' of ' + where if where else ''}: {', '.join(names)}")
    # random_init=true means the unset path is not wanted.
    random_init = "random_init" in data and _convert(bool, data["random_init"], f"{where}.random_init")
    checked = _ENV_SECTIONS.get()
    if checked is not None and where.split(".")[0] not in checked:
        random_init = True  # a section the caller will not use: an unset path is simply absent
    for f in dataclasses.fields(cls):
        if f.metadata.get("env_required") and not random_init and isinstance(data.get(f.name), str):
            unset = [name for name in _ENV.findall(data[f.name]) if not os.environ.get(name)]
            if unset:
                key = f"{where}.{f.name}" if where else f.name
                raise ValueError(f"{key} is {data[f.name]!r} but the environment variable {unset[0]} is not set: "
                                 f"set it to the local folder, or override {key}=<folder>"
                                 + (f" (or {where}.random_init=true for random weights)" if "random_init" in names
                                    else ""))
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(data: dict, item: str) -> None:
    """Apply one ``key.sub=value`` override (the value read as YAML: numbers, lists, null)."""
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    dotted, value = (part.strip() for part in item.split("=", 1))
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"override {item!r} has no key" if not dotted else
                         f"override {item!r}: {dotted!r} is not a key.sub path")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        raise ValueError(f"override {item!r} : {value!r} is not valid YAML (quote strings that contain "
                         "brackets, colons or commas)") from None
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {key} is not a section")
    node[keys[-1]] = parsed


def shipped_configs() -> list[str]:
    # configs/gen/ holds the generator's configs (muse.gen.config), another family.
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
                  if p.relative_to(CONFIG_DIR).parts[0] != "gen")


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _resolve(name_or_path: str, folder: Path | None = None) -> Path:
    """A shipped config name (no suffix) or a YAML path; a relative path in an ``inherit:`` is read
    next to the file that names it (``folder``), as a relative path on the command line is from the
    current folder."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"a config must be a shipped name or a YAML path, got {name_or_path!r}")
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    elif folder is not None and not path.is_absolute():
        path = folder / path
    if not path.exists():
        where = f" (read next to {folder})" if folder is not None and Path(name_or_path).suffix else ""
        raise FileNotFoundError(f"no config {str(name_or_path)!r}{where}; shipped configs: "
                                f"{', '.join(shipped_configs())}")
    return path


def _read(name_or_path: str, seen: tuple = (), folder: Path | None = None) -> dict:
    """A YAML file; an ``inherit: <name or path>`` key merges it over that config."""
    path = _resolve(name_or_path, folder)
    if path.resolve() in seen:
        raise ValueError(f"config inheritance loops through {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{path}: invalid YAML{at}: {problem}") from None
    if data is None:
        raise ValueError(f"{path} is empty: a config needs at least one section (or an inherit: line)")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections (model:, data:, ...), got a "
                         f"{type(data).__name__}")
    parent = data.pop("inherit", None)
    return _merge(_read(parent, (*seen, path.resolve()), path.parent), data) if parent else data


def load_config(name_or_path: str, overrides: list[str] | None = None,
                env_sections: tuple[str, ...] | None = None) -> Config:
    """A shipped config name (``"tiny"``, ``"tiny/stage1"``, ``"muse_1b/stage1"``) or a YAML path, plus
    ``key.sub=value`` overrides. A checkpoint path naming an unset ``${VAR}`` is an error — in every
    section, or only in ``env_sections`` (``("model",)`` for tools that never train: the loss's
    perceptual weights are then not needed)."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key.sub=value' strings, got the string {overrides!r} "
                        f"(write [{overrides!r}])")
    data = _read(name_or_path)
    for item in overrides or []:
        _set_path(data, item)
    token = _ENV_SECTIONS.set(env_sections)
    try:
        return _build(Config, data)
    finally:
        _ENV_SECTIONS.reset(token)
