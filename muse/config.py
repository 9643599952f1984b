"""Typed configuration: dataclasses loaded from YAML, with ``key.sub=value`` overrides.

Unknown keys are rejected with the list of valid ones; values are converted to the field's type.
Shipped configs live in ``muse/configs/*.yaml`` and are named by path without the suffix
(``"tiny"``, ``"muse_1b"``). Paths to local checkpoints come from environment variables
(``${MUSE_INTERNVIT_PATH}``) so that no config names a hub.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class EncoderConfig:
    """InternViT (``InternVLVisionModel``). ``pretrained``: a local folder for ``from_pretrained``;
    without it the model is built randomly from the sizes below."""

    pretrained: str | None = None
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14


@dataclass
class TeacherConfig:
    """DINOv3 ViT (``DINOv3ViTModel``), frozen; its last layer's attention supervises the maps."""

    pretrained: str | None = None
    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    intermediate_size: int = 5120
    patch_size: int = 16
    num_register_tokens: int = 4


@dataclass
class DecoderConfig:
    """DC-AE decoder (diffusers ``AutoencoderDC``); ``pretrained`` is a local AutoencoderDC folder."""

    pretrained: str | None = None
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    layers_per_block: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 3, 3])
    block_types: list[str] = field(default_factory=lambda: ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock",
                                                            "EfficientViTBlock", "EfficientViTBlock"])
    qkv_multiscales: list[list[int]] = field(default_factory=lambda: [[], [], [], [5], [5], [5]])
    attention_head_dim: int = 32


@dataclass
class TextConfig:
    """Frozen CLIP text encoder (``CLIPTextModelWithProjection``); ``embed_dim`` is its projection width.
    ``tokenizer``: a local CLIP tokenizer folder; without one, a hashing word tokenizer (for random
    text encoders: tiny configs and tests)."""

    pretrained: str | None = None
    tokenizer: str | None = None
    max_length: int = 77
    embed_dim: int = 768
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    vocab_size: int = 49408


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
    decoder_adapter: bool = False
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
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if self.backend not in ("auto", "triton", "torch", "cuda"):
            raise ValueError(f"model.backend must be auto, triton, torch or cuda, got {self.backend!r}")


@dataclass
class DataConfig:
    """WebDataset sources: one shard pattern per source, mixed by ``ratios`` (equal by default)."""

    shards: list[str] = field(default_factory=list)
    ratios: list[float] | None = None
    batch_size: int = 32
    num_workers: int = 4

    def __post_init__(self):
        if self.ratios is not None and len(self.ratios) != len(self.shards):
            raise ValueError(f"data.ratios has {len(self.ratios)} entries for {len(self.shards)} data.shards")


@dataclass
class OptimConfig:
    lr: float = 4e-4
    end_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    backbone_lr_scale: float = 1.0
    disc_lr: float = 1e-4


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
    reconstruction_kind: str = "l2"
    disc_start: int = 0
    # Perceptual backbones ("torchvision:vgg16", "timm:convnext_small") with local weight files.
    lpips_backbone: str | None = None
    lpips_weights: str | None = None
    lpips_layers: list[str] = field(default_factory=list)
    convnext_backbone: str | None = None
    convnext_weights: str | None = None


@dataclass
class TrainConfig:
    stage: int = 1
    steps: int = 50000
    out_dir: str = "runs/muse"
    # The previous stage's checkpoint: its EMA weights initialise this stage.
    init_weight: str | None = None
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    ema_decay: float = 0.9999
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3
    max_bad_steps: int = 10
    # Reconstruction and student-vs-teacher attention PNGs, and the gradient-orthogonality cosines,
    # every so many steps (0: never). TensorBoard scalars beside log.jsonl when tensorboard is installed.
    image_every: int = 1000
    ortho_every: int = 1000
    tensorboard: bool = True

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"train.stage must be 1, 2 or 3, got {self.stage}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_ENV = re.compile(r"\$\{(\w+)\}")


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
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(value) if value.strip() else None


def shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config {name_or_path!r}; shipped configs: {', '.join(shipped_configs())}")
    return path


def _read(name_or_path: str, seen: tuple = ()) -> dict:
    """A YAML file; an ``inherit: <name or path>`` key merges it over that config."""
    path = _resolve(name_or_path)
    if path in seen:
        raise ValueError(f"config inheritance loops through {path}")
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("inherit", None)
    return _merge(_read(parent, (*seen, path)), data) if parent else data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A shipped config name (``"tiny"``, ``"tiny/stage1"``, ``"muse_1b/stage1"``) or a YAML path, plus
    ``key.sub=value`` overrides."""
    data = _read(name_or_path)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        _set_path(data, key.strip(), value)
    return _build(Config, data)
