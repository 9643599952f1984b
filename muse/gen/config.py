"""Typed configuration of the latent generator (``muse-train-gen``, ``muse-generate``, ``muse-eval gfid``).

The same machinery as the tokenizer's configs (``muse.config``): dataclasses built from YAML with
``inherit:`` chains and ``key.sub=value`` overrides, unknown keys rejected with the valid ones.
Shipped generator configs live in ``muse/configs/gen/`` and are named ``gen/<name>``
(``gen/tiny``, ``gen/sana_600m``, ``gen/sana_1600m``).

Model sizes: SANA's, as diffusers' ``scripts/convert_sana_to_diffusers.py`` builds
``SanaTransformer2DModel`` for the released checkpoints — ``SanaMS_600M_P1_D28``: 28 layers, 36 heads
× 32 (width 1152), 16 cross-attention heads × 72; ``SanaMS_1600M_P1_D20``: 20 layers, 70 heads × 32
(width 2240), 20 cross-attention heads × 112 (the constructor's defaults); both ``mlp_ratio`` 2.5,
patch size 1, no positional embedding at 512/1024 px (``interpolation_scale`` None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from muse.config import LoopConfig, _build, _read, _require, _set_path


@dataclass
class GenModelConfig:
    """``SanaTransformer2DModel`` on a ``latent_size``² grid of ``latent_channels`` (the tokenizer's
    latents: MUSE-1B gives 32 × 8 × 8 at 224 px). ``condition: class``: an ``nn.Embedding`` of
    ``num_classes`` + 1 rows (the last is the null class of classifier-free guidance), each a single
    ``caption_channels``-wide token for SANA's caption input; ``condition: text``: caption embeddings
    (``caption_channels`` wide, one token per row or a sequence) with a learned null token.
    ``interpolation_scale``: None for SANA's no positional embedding (position comes from the Mix-FFN's
    depth-wise convolutions), a number for diffusers' sin-cos embedding at that scale."""

    latent_channels: int = 32
    latent_size: int = 8
    condition: str = "class"
    num_classes: int = 1000
    caption_channels: int = 1152
    num_layers: int = 28
    num_attention_heads: int = 36
    attention_head_dim: int = 32
    num_cross_attention_heads: int = 16
    cross_attention_head_dim: int = 72
    mlp_ratio: float = 2.5
    patch_size: int = 1
    norm_eps: float = 1e-6
    qk_norm: str | None = None
    interpolation_scale: float | None = None

    def __post_init__(self):
        if self.condition not in ("class", "text"):
            raise ValueError(f"model.condition must be 'class' or 'text', got {self.condition!r}")
        _require("model", self, positive=("latent_channels", "latent_size", "num_classes", "caption_channels",
                                          "num_layers", "num_attention_heads", "attention_head_dim",
                                          "num_cross_attention_heads", "cross_attention_head_dim", "mlp_ratio",
                                          "patch_size", "norm_eps", "interpolation_scale"))
        if self.latent_size % self.patch_size:
            raise ValueError(f"model.latent_size ({self.latent_size}) must be divisible by model.patch_size "
                             f"({self.patch_size})")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class FlowConfig:
    """Flow matching as the paper's eq. 6: x_t = (1 − t)·x₀ + t·ε, the model predicts v = ε − x₀.
    ``timesteps``: ``logit_normal`` (t = sigmoid(n), n ~ N(``logit_mean``, ``logit_std``²); SD3's
    choice) or ``uniform`` on (0, 1). ``label_dropout``: the probability that a sample's condition is
    replaced by the null one (classifier-free guidance training)."""

    timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    label_dropout: float = 0.1

    def __post_init__(self):
        if self.timesteps not in ("logit_normal", "uniform"):
            raise ValueError(f"flow.timesteps must be 'logit_normal' or 'uniform', got {self.timesteps!r}")
        _require("flow", self, positive=("logit_std",))
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"flow.label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass
class GenDataConfig:
    """``latents``: the folder ``muse-encode-latents --out`` wrote (latent shards and ``stats.json``).
    Each step draws a global batch of ``batch_size`` · world size from one seeded permutation per epoch,
    so the batches are a function of the step alone (an exact resume needs no data state)."""

    latents: str = ""
    batch_size: int = 256

    def __post_init__(self):
        _require("data", self, positive=("batch_size",))


@dataclass
class GenOptimConfig:
    """AdamW with muse.training.optim's schedule: linear warm-up from 0, then cosine to ``end_lr``
    (``end_lr`` = ``lr``: constant)."""

    lr: float = 1e-4
    end_lr: float = 1e-4
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    no_decay_keywords: list[str] = field(default_factory=lambda: ["bias", "norm", "embedding", "scale_shift_table"])
    grad_clip: float = 1.0

    def __post_init__(self):
        _require("optim", self, positive=("lr", "grad_clip"), non_negative=("end_lr", "warmup_steps", "weight_decay"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class GenSampleConfig:
    """Sampling (training grids, ``muse-generate`` and ``muse-eval gfid`` defaults): ``sampler`` euler
    (diffusers' ``FlowMatchEulerDiscreteScheduler`` grid) or heun (2nd order on the same grid),
    ``steps`` model evaluations per sample (Heun: about twice), ``cfg_scale`` (1: no guidance),
    ``shift`` the scheduler's timestep shift, ``classes`` shown in training grids."""

    sampler: str = "euler"
    steps: int = 50
    cfg_scale: float = 4.0
    shift: float = 1.0
    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7])
    seed: int = 0
    every: int = 5000

    def __post_init__(self):
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"sample.sampler must be 'euler' or 'heun', got {self.sampler!r}")
        _require("sample", self, positive=("steps", "shift"), non_negative=("cfg_scale", "every", "classes"))


@dataclass
class TokenizerRef:
    """The tokenizer whose decoder turns samples into pixels: a tokenizer ``config`` name or path with
    a ``checkpoint`` of ours (file or run folder) or an ``official`` MUSE checkpoint. Unset: training
    writes no sample grids."""

    config: str | None = None
    checkpoint: str | None = None
    official: str | None = None

    def __post_init__(self):
        if self.checkpoint and self.official:
            raise ValueError("tokenizer: give checkpoint (ours) or official, not both")


@dataclass
class GenTrainConfig(LoopConfig):
    steps: int = 400000
    out_dir: str = "runs/gen"
    ema_decay: float = 0.9999
    log_every: int = 100
    ckpt_every: int = 10000


@dataclass
class GenConfig:
    model: GenModelConfig = field(default_factory=GenModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: GenDataConfig = field(default_factory=GenDataConfig)
    optim: GenOptimConfig = field(default_factory=GenOptimConfig)
    sample: GenSampleConfig = field(default_factory=GenSampleConfig)
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    train: GenTrainConfig = field(default_factory=GenTrainConfig)


def load_gen_config(name_or_path: str, overrides: list[str] | None = None) -> GenConfig:
    """A shipped generator config (``gen/tiny``, ``gen/sana_600m``, ``gen/sana_1600m``) or a YAML path,
    plus ``key.sub=value`` overrides."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key.sub=value' strings, got the string {overrides!r}")
    data = _read(name_or_path)
    for item in overrides or []:
        _set_path(data, item)
    return _build(GenConfig, data)


def gen_config_from_record(record: dict) -> GenConfig:
    """The config a generator checkpoint recorded (``config_record``), rebuilt and checked."""
    return _build(GenConfig, record)
