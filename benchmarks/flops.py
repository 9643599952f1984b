"""FLOPs, bytes and roofline time per component and training stage of one MUSE training step.

    python -m benchmarks.flops                                   # muse_1b/stage{1,2,3}, B=32, 224², H100
    python -m benchmarks.flops --image-size 448 --gpu h200 --json flops.json
    python -m benchmarks.flops --config tiny/stage2 --batch 4 --image-size 32 --stages 2
    python -m benchmarks.flops --image-size 448 --set model.supervise=all model.topo_reduction=per_head

The step is the trainer's (``muse/train.py``), built from the real classes with random weights: the
tokenizer, its losses as the trainer builds them, the CLIP text encoder, the optimizers and the EMA.
Nothing is allocated and nothing is computed: the modules are built on the meta device and run on
fake CPU tensors (``FakeTensorMode``: shapes, dtypes and strides only). Fake CPU tensors rather than
meta tensors, because ``muse_kernels`` asks ``torch.is_autocast_enabled(device.type)``, which raises
for the meta device, and because the CPU dispatch keys let autocast insert its casts as on a GPU.

What is counted, per aten op (below autograd, so backward ops are counted like forward ones):
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention: 2 per
  multiply-add; elementwise work is not counted), with two corrections: torch's formula for the
  weight gradient of a grouped convolution ignores ``groups`` (it counts ``groups`` times too many),
  and CPU's fused attention op has no formula (it gets SDPA's).
- Bytes: every op's input plus output tensor bytes (each tensor's distinct memory: an expanded tensor
  is read once), views free. This is *unfused* traffic: what the step moves if every aten op is its
  own kernel, as in eager PyTorch; a fused kernel moves less.
- Dtypes: the trainer's bf16 autocast. CPU autocast casts matmul and convolution inputs to bf16 as
  CUDA's does (those casts are counted, fp32 weights read once per step through autocast's cache);
  the ops CUDA's autocast runs in fp32 (norms, softmax, exp/pow/rsqrt, sums, losses, interpolation)
  are cast to fp32 here as CUDA would (``CudaAutocastPolicy``). Parameters, gradients, optimizer
  states and the EMA are fp32, as in training. Losses run with autocast off (fp32), as in training.
- Attention: on CPU tensors ``muse_kernels`` runs its eager reference (maps materialized), so the
  connector's and the teacher's attention bytes are those of the unfused path; the FLOPs are the
  same matmuls the fused kernels do.

Roofline per component: max(Σ FLOPs / peak of their precision, bytes / bandwidth). bf16 work (matmuls
under autocast) at the bf16 peak; fp32 convolutions at the TF32 peak (cuDNN's default); fp32 matmuls
at the FP32 peak (``torch.backends.cuda.matmul.allow_tf32`` is off by default and the trainer does
not set it; ``--tf32-matmul`` counts them at the TF32 peak). The bf16 peak and the bandwidths are the
measured H100/H200 figures (SPEC §6); the TF32 and FP32 peaks are derived from them with NVIDIA's
H100 SXM datasheet ratios (dense TF32 = ½ bf16, FP32 = 67/989 of bf16), not measured. The total's
roofline is the sum of its components' (they run one after another).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import re
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count
from torch.overrides import TorchFunctionMode

log = logging.getLogger("benchmarks.flops")
aten = torch.ops.aten

DEFAULT_CONFIG = "muse_1b/stage2"
PARTS = ("encoder", "teacher", "decoder", "text")


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float
    bandwidth_tbps: float


# bf16 GEMM and copy bandwidth: measured (SPEC §6). TF32 / FP32: the datasheet ratios applied to the
# measured bf16 figure (H100 SXM dense: bf16 989, TF32 495, FP32 67 TFLOP/s; the H200 has the same SMs).
_TF32_RATIO, _FP32_RATIO = 494.7 / 989.4, 66.9 / 989.4
PRESETS = {
    "h100": Hardware("H100 80GB", 790.0, 790.0 * _TF32_RATIO, 790.0 * _FP32_RATIO, 3.0),
    "h200": Hardware("H200 141GB", 790.0, 790.0 * _TF32_RATIO, 790.0 * _FP32_RATIO, 4.3),
}

# Component → the ModuleTracker names (module paths from the root modules) whose work it owns.
COMPONENTS = {
    "encoder": ("MuseTokenizer.encoder",),
    "teacher": ("MuseTokenizer.dino_teacher", "MuseTokenizer.structural_teacher"),
    "connector": ("MuseTokenizer.adapter_mlp", "MuseTokenizer.muse_blocks", "MuseTokenizer.grad_scaler",
                  "MuseTokenizer.to_latent", "MuseTokenizer.semantic_projector"),
    "decoder": ("MuseTokenizer.decoder", "MuseTokenizer.decoder_adapter"),
    "perceptual": ("MuseLoss.perceptual",),
    "discriminator": ("MuseLoss.discriminator",),
    "text": ("ClipTextEncoder",),
    "optimizer": ("optimizer",),
}
# Not in a component: image normalization, space-to-depth, the teacher map's head mean and Ψ, the
# decoder output's resize, the pixel, topology-glue and ITC losses.
OTHER = "other"
GLOBAL = "Global"
_GLOBAL_ONLY = frozenset((GLOBAL,))
COMPONENT_NOTES = {
    "encoder": "InternViT", "teacher": "DINOv3, no grad", "connector": "adapter, blocks, heads",
    "decoder": "DC-AE decoder", "perceptual": "LPIPS VGG16 + ConvNeXt-S, fp32",
    "discriminator": "PatchGAN, fp32", "text": "CLIP text, fp32, no grad",
    "optimizer": "clip + AdamW + EMA", OTHER: "glue and pixel/ITC losses",
}


# ------------------------------------------------------------------------------- FLOP formulas

def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """``aten.convolution_backward`` with ``groups`` honoured. torch's formula computes the weight
    gradient as a convolution of the input with the output gradient over *all* input channels, i.e.
    ``groups`` times the work for a grouped convolution. Both gradients of a convolution cost what its
    forward costs: the input gradient is the transposed convolution with the same weight, the weight
    gradient pairs every output position with every weight element once (``w_shape`` already holds
    C_in / groups)."""
    forward_out = grad_out_shape
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(x_shape, w_shape, forward_out, transposed=transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, forward_out, transposed=transposed)
    return flops


def _cpu_flash_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


FLOP_CORRECTIONS = {
    aten.convolution_backward: grouped_conv_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flop,
}


def flop_counter(corrected: bool = True) -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=FLOP_CORRECTIONS if corrected else None)


# ------------------------------------------------------------------------------- autocast policy

# CUDA's autocast runs these in fp32 (aten/src/ATen/autocast_mode.h, AT_FORALL_FP32 and
# AT_FORALL_FP32_SET_OPT_DTYPE, by their Python names); CPU's autocast leaves most of them in bf16.
_CUDA_FP32_OPS = frozenset("""
acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__ __rpow__ softplus
layer_norm rms_norm group_norm cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss
hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits
dist pdist cdist renorm logsumexp interpolate upsample cross_entropy
""".split())
# These get dtype=float32 appended (their input is not copied first when the kernel can read bf16).
_CUDA_FP32_SET_DTYPE_OPS = frozenset("prod softmax log_softmax cumprod cumsum sum norm vector_norm matrix_norm".split())


class CudaAutocastPolicy(TorchFunctionMode):
    """Where the trainer's bf16 autocast is on, run the ops CUDA's autocast runs in fp32 in fp32, as
    CUDA would: bf16 inputs cast to fp32 above autograd (so the casts and their backward are recorded
    as autocast's are), or ``dtype=torch.float32`` appended for the reductions that take one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if (name in _CUDA_FP32_OPS or name in _CUDA_FP32_SET_DTYPE_OPS) and torch.is_autocast_enabled("cpu") \
                and _has_low_precision(args, kwargs):
            if name in _CUDA_FP32_SET_DTYPE_OPS and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
            else:
                args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, _to_fp32, (args, kwargs))
        return func(*args, **kwargs)


def _has_low_precision(args, kwargs) -> bool:
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) for t in flat)


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# ------------------------------------------------------------------------------- byte counting

# Ops that move no data (allocation, metadata) besides the views, found from their schemas.
_NO_TRAFFIC = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
               aten.lift_fresh, aten._local_scalar_dense, aten.detach, aten.alias, aten.set_}
_CONVOLUTIONS = {aten.convolution, aten._convolution, aten.convolution_backward}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct memory a tensor covers (an expanded, stride-0 tensor is read once)."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(t.numel(), extent) * t.element_size()


@dataclass
class Tally:
    """One scope's work, split by pass: FLOPs per math precision, and bytes."""

    flops: dict = field(default_factory=lambda: defaultdict(float))  # (pass, precision) → FLOPs
    bytes: dict = field(default_factory=lambda: defaultdict(float))  # pass → bytes

    def add(self, other: "Tally") -> None:
        for key, value in other.flops.items():
            self.flops[key] += value
        for key, value in other.bytes.items():
            self.bytes[key] += value

    def subtract(self, other: "Tally") -> None:
        for key, value in other.flops.items():
            self.flops[key] -= value
        for key, value in other.bytes.items():
            self.bytes[key] -= value

    def total_flops(self) -> float:
        return sum(self.flops.values())

    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def flops_by_precision(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (_, precision), value in self.flops.items():
            out[precision] += value
        return dict(out)

    def passes(self) -> str:
        done = [p for p in ("fwd", "bwd") if self.bytes.get(p, 0) > 0 or any(
            v > 0 for (q, _), v in self.flops.items() if q == p)]
        return "+".join(done) or "-"


def components_of(scopes) -> tuple[str, ...]:
    """The components owning any of the running module scopes (a scope belongs to a component when
    it is one of the component's module paths or lies below one: ``MuseTokenizer.muse_blocks.3``)."""
    return tuple(name for name, prefixes in COMPONENTS.items()
                 if any(s == p or s.startswith(p + ".") for s in scopes for p in prefixes))


class GraphScopes(TorchFunctionMode):
    """Remembers which module scopes were running when each autograd node was made, so that its
    backward work goes to them. (ModuleTracker's own backward tracking leaves a module "entered"
    until the gradient of its input is complete: a module whose input is shared with another, as the
    perceptual nets' and the discriminator's reconstruction is, would get the other's backward too.)"""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker
        self.nodes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            self._record(out)
        return out

    def _record(self, out) -> None:
        pending = [t.grad_fn for t in torch.utils._pytree.tree_flatten(out)[0]
                   if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        scopes = None
        while pending:
            node = pending.pop()
            if node is None or node in self.nodes:
                continue
            scopes = scopes or frozenset(self.tracker.parents)
            self.nodes[node] = scopes
            pending.extend(next_node for next_node, _ in node.next_functions)


class TrafficCounter(TorchDispatchMode):
    """Per aten op: input + output bytes and (through ``flops``' formulas) FLOPs by math precision,
    added to every scope running it, split into forward and backward: in forward the module
    tracker's scopes, in backward those recorded for the autograd node being run (``graph``)."""

    def __init__(self, flops: FlopCounterMode, graph: GraphScopes, tf32_matmul: bool = False):
        super().__init__()
        self.tracker = flops.mod_tracker
        self.registry = flops.flop_registry
        self.graph = graph
        self.tf32_matmul = tf32_matmul
        self.tallies: dict[str, Tally] = defaultdict(Tally)  # component (and GLOBAL) → its work
        # Ops whose running scopes fall in more than one component (each gets the op): should be none.
        self.overlapping_ops = 0
        self.ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # (component, op) → bytes, FLOPs
        self._components: dict[frozenset, tuple[str, ...]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _NO_TRAFFIC or func is torch.ops.prim.device.default or _is_view(func):
            return out
        tensors = [t for t in torch.utils._pytree.tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(tensor_bytes(t) for t in tensors)
        flops = self.registry[packet](*args, **kwargs, out_val=out) if packet in self.registry else 0
        if torch._C._current_graph_task_id() != -1:
            phase = "bwd"
            # Work the engine does outside any recorded node (the seed gradient) counts in the total only.
            scopes = self.graph.nodes.get(torch._C._current_autograd_node(), _GLOBAL_ONLY)
        else:
            phase, scopes = "fwd", frozenset(self.tracker.parents)
        precision = self._precision(packet, tensors) if flops else None
        components = self._components.get(scopes)
        if components is None:
            components = self._components[scopes] = components_of(scopes)
        self.overlapping_ops += len(components) > 1
        for name in (GLOBAL, *components):
            op = self.ops[(name, packet.__name__)]
            op[0] += nbytes
            op[1] += flops
            tally = self.tallies[name]
            tally.bytes[phase] += nbytes
            if flops:
                tally.flops[(phase, precision)] += flops
        return out

    def _precision(self, packet, tensors) -> str:
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        if any(d in (torch.bfloat16, torch.float16) for d in floating):
            return "bf16"
        if packet in _CONVOLUTIONS or self.tf32_matmul:
            return "tf32"
        return "fp32"


# ------------------------------------------------------------------------------- the step

def _stage_config_name(config: str, stage: int) -> str:
    match = re.fullmatch(r"(.+)/stage[123]", config)
    return f"{match.group(1)}/stage{stage}" if match else config


def load_stage_config(config: str, stage: int, batch: int, image_size: int, overrides: list[str] = ()):
    """The stage's config of ``config``'s family (``muse_1b/stage2`` → ``muse_1b/stage{stage}``; any
    other name or path is used for every stage with ``train.stage`` set), every pretrained part
    random (nothing is read) and the input checks off (they read pixel values), then ``overrides``."""
    from muse.config import load_config

    name = _stage_config_name(config, stage)
    fixed = [f"model.{part}.pretrained=null" for part in PARTS]
    fixed += [f"model.{part}.random_init=true" for part in PARTS]
    fixed += ["model.check_inputs=false", f"model.image_size={image_size}", f"data.batch_size={batch}",
                  f"train.stage={stage}", "loss.vgg16_weights=null", "loss.convnext_weights=null",
                  "loss.disc_init=null", "train.init_weight=null"]
    return load_config(name, fixed + list(overrides), env_sections=("model",))


def _build_on_meta(cfg):
    """The trainer's modules (muse/train.py) on the meta device: shapes only, no weights drawn."""
    from muse.losses import MuseLoss
    from muse.models import ClipTextEncoder, MuseTokenizer, build_tokenizer
    from muse.train import build_discriminator, build_perceptual

    meta = torch.device("meta")
    with torch.device(meta), warnings.catch_warnings(), _quiet("muse", "transformers", "diffusers"):
        warnings.simplefilter("ignore")
        model = MuseTokenizer(cfg.model)
        discriminator = build_discriminator(cfg, meta)
        loss_fn = MuseLoss(cfg.loss, build_perceptual(cfg, meta), discriminator, cfg.loss.reconstruction_kind,
                           cfg.loss.lecam_decay, cfg.loss.disc_factor)
        text_encoder = ClipTextEncoder(cfg.model.text) if cfg.loss.itc else None
    tokenize = build_tokenizer(cfg.model.text) if cfg.loss.itc else None
    return model, loss_fn, discriminator, text_encoder, tokenize


@contextlib.contextmanager
def _library_caches_bypassed():
    """Model code that caches tensors per shape (transformers' ``lru_cache``-wrapped helpers, e.g.
    DINOv3's patch coordinates) runs uncached: under fake tensors the cache would keep fake tensors
    and hand them to every real forward that follows in the process."""
    patches = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            cells = getattr(value, "__closure__", None) or ()
            cached = isinstance(value, functools._lru_cache_wrapper) or any(
                isinstance(getattr(cell, "cell_contents", None), functools._lru_cache_wrapper) for cell in cells)
            if cached and hasattr(value, "__wrapped__"):
                patches.append((module, attr, value))
    for module, attr, value in patches:
        setattr(module, attr, value.__wrapped__)
    try:
        yield
    finally:
        for module, attr, value in patches:
            setattr(module, attr, value)


class _quiet:
    """Silences the 'random weights' warnings of the given loggers while the modules are built."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


@dataclass
class StageCount:
    stage: int
    config: str
    batch: int
    image_size: int
    components: dict[str, Tally]
    total: Tally
    flop_counter_total: float | None
    trainable_parameters: int
    overlapping_ops: int
    top_ops: dict[str, list[dict]]


class _Scope:
    """Attributes the work inside it to ``name`` (for work outside any module: the optimizer)."""

    def __init__(self, tracker, name: str):
        self.tracker, self.name = tracker, name

    def __enter__(self):
        self.tracker.parents.add(self.name)

    def __exit__(self, *exc):
        self.tracker.parents.discard(self.name)


class Counting:
    """Counts everything run inside it (real or fake tensors): ``total`` and ``components()``.

    FLOPs come from ``FlopCounterMode``'s formulas (with ``FLOP_CORRECTIONS`` unless ``corrected`` is
    off), applied per op by ``TrafficCounter`` beside the bytes. ``cross_check`` also runs the
    FlopCounterMode itself (slower; its total is then ``flop_counter_total``, else None)."""

    def __init__(self, tf32_matmul: bool = False, corrected: bool = True, cross_check: bool = False):
        self.flops = flop_counter(corrected)
        self.cross_check = cross_check
        self.graph = GraphScopes(self.flops.mod_tracker)
        self.counter = TrafficCounter(self.flops, self.graph, tf32_matmul=tf32_matmul)
        self.policy = CudaAutocastPolicy()
        self._outer = self.flops if cross_check else self.flops.mod_tracker

    def __enter__(self):
        for mode in (self._outer, self.counter, self.graph, self.policy):
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in (self.policy, self.graph, self.counter, self._outer):
            mode.__exit__(*exc)

    def scope(self, name: str) -> _Scope:
        return _Scope(self.flops.mod_tracker, name)

    @property
    def total(self) -> Tally:
        return self.counter.tallies[GLOBAL]

    @property
    def overlapping_ops(self) -> int:
        return self.counter.overlapping_ops

    @property
    def flop_counter_total(self) -> float | None:
        return self.flops.get_total_flops() if self.cross_check else None

    def top_ops(self, component: str, count: int = 8) -> list[dict]:
        """The aten ops that move the most bytes in ``component`` (or GLOBAL), with their FLOPs."""
        rows = [(op, b, f) for (name, op), (b, f) in self.counter.ops.items() if name == component]
        rows.sort(key=lambda row: -row[1])
        return [{"op": op, "gb": b / 1e9, "tflop": f / 1e12} for op, b, f in rows[:count]]

    def components(self) -> dict[str, Tally]:
        """Every component's work, and ``other``: the total's work outside them."""
        components = {name: self.counter.tallies.get(name, Tally()) for name in COMPONENTS}
        other = Tally()
        other.add(self.total)
        for tally in components.values():
            other.subtract(tally)
        return components | {OTHER: other}


def _initialise_state(optimizer: torch.optim.Optimizer) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_stage(config: str, stage: int, batch: int = 32, image_size: int = 224, tf32_matmul: bool = False,
                corrected: bool = True, cross_check: bool = False, overrides: list[str] = ()) -> StageCount:
    """One training step of ``stage`` as ``muse/train.py`` runs it, counted (``Counting``) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from muse.training.ema import EMA
    from muse.training.checkpoint import FROZEN_PREFIXES
    from muse.training.optim import build_discriminator_optimizer, build_optimizer
    from muse.training.stages import configure_stage
    from muse.training.loop import autocast_for

    cfg = load_stage_config(config, stage, batch, image_size, overrides)
    model, loss_fn, discriminator, text_encoder, tokenize = _build_on_meta(cfg)
    oc = cfg.optim
    with FakeTensorMode(allow_non_fake_inputs=True), _library_caches_bypassed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in (model, loss_fn, text_encoder):
            if module is not None:
                module.to_empty(device="cpu")
        model.train()
        trainable = configure_stage(model, stage)
        trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = build_optimizer(model, oc.lr, oc.weight_decay, oc.betas, oc.backbone_lr_scale,
                                    oc.no_decay_keywords)
        disc_optimizer = None
        if discriminator is not None:
            decay = oc.weight_decay if oc.disc_weight_decay is None else oc.disc_weight_decay
            disc_optimizer = build_discriminator_optimizer(discriminator, oc.disc_lr, decay, oc.betas,
                                                           oc.no_decay_keywords)
            trainable_numel += sum(p.numel() for p in discriminator.parameters())
        # torch picks the foreach implementation on CUDA, the per-tensor loop for CPU (and fake) tensors.
        for opt in (optimizer, disc_optimizer):
            for group in (opt.param_groups if opt is not None else ()):
                group["foreach"] = True
        # A step of a running training: AdamW's state exists already (its first step allocates it).
        for opt in (optimizer, disc_optimizer):
            if opt is not None:
                _initialise_state(opt)
        ema = EMA(model, cfg.train.ema_decay, skip_prefixes=FROZEN_PREFIXES, warmup=cfg.train.ema_warmup)
        images = torch.empty(batch, 3, image_size, image_size)
        tokens = tokenize(["a photo of an object"] * batch) if tokenize is not None else None
        autocast, _ = autocast_for("bf16", images.device)
        adversarial = discriminator is not None and 0 >= cfg.loss.disc_start

        with Counting(tf32_matmul=tf32_matmul, corrected=corrected, cross_check=cross_check) as counting:
            text_embeds = text_encoder(**tokens) if text_encoder is not None else None
            with autocast:
                out = model(images, text_embeds=text_embeds)
                loss, _ = loss_fn(out, images, text_embeds, adversarial=adversarial)
            loss.backward()
            with counting.scope("optimizer"):
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], oc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
            if adversarial:
                with autocast:
                    d_loss, _ = loss_fn.discriminator_loss(out.reconstruction, images)
                disc_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                with counting.scope("optimizer"):
                    clip = oc.grad_clip if oc.disc_grad_clip is None else oc.disc_grad_clip
                    torch.nn.utils.clip_grad_norm_(discriminator.parameters(), clip)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
    del trainable
    return StageCount(stage, _stage_config_name(config, stage), batch, image_size, counting.components(),
                      counting.total, counting.flop_counter_total, trainable_numel, counting.overlapping_ops,
                      {name: counting.top_ops(name) for name in (*COMPONENTS, GLOBAL)})


# ------------------------------------------------------------------------------- roofline and output

def roofline(tally: Tally, hw: Hardware) -> dict:
    peaks = {"bf16": hw.bf16_tflops, "tf32": hw.tf32_tflops, "fp32": hw.fp32_tflops}
    by_precision = tally.flops_by_precision()
    compute_ms = sum(f / (peaks[p] * 1e12) for p, f in by_precision.items()) * 1e3
    memory_ms = tally.total_bytes() / (hw.bandwidth_tbps * 1e12) * 1e3
    return {"tflop": tally.total_flops() / 1e12, "tflop_by_precision": {p: f / 1e12 for p, f in by_precision.items()},
            "gb": tally.total_bytes() / 1e9, "gb_fwd": tally.bytes.get("fwd", 0.0) / 1e9,
            "gb_bwd": tally.bytes.get("bwd", 0.0) / 1e9, "passes": tally.passes(),
            "compute_ms": compute_ms, "memory_ms": memory_ms, "roofline_ms": max(compute_ms, memory_ms),
            "bound": "compute" if compute_ms >= memory_ms else "memory"}


def stage_report(count: StageCount, hw: Hardware) -> dict:
    rows = {name: roofline(tally, hw) for name, tally in count.components.items()}
    if rows["optimizer"]["gb"] > 0:
        rows["optimizer"]["passes"] = "step"  # after backward, outside autograd
    total = roofline(count.total, hw)
    # Components run one after another: the step's roofline is the sum of theirs.
    total["roofline_ms"] = sum(r["roofline_ms"] for r in rows.values())
    total["bound"] = "sum of components"
    return {"stage": count.stage, "config": count.config, "batch": count.batch, "image_size": count.image_size,
            "trainable_parameters": count.trainable_parameters, "components": rows, "total": total,
            "flop_counter_total_tflop": (None if count.flop_counter_total is None
                                         else count.flop_counter_total / 1e12), "overlapping_ops": count.overlapping_ops,
            "top_ops_by_bytes": count.top_ops}


def _fmt_flop(tflop: float) -> str:
    return f"{tflop:8.2f} TFLOP" if tflop >= 1 else f"{tflop * 1e3:8.1f} GFLOP"


def format_stage(report: dict) -> str:
    lines = [f"stage {report['stage']} ({report['config']}, B={report['batch']}, {report['image_size']}², "
             f"{report['trainable_parameters'] / 1e6:.0f} M trainable parameters)",
             f"  {'component':<14}{'passes':<9}{'FLOPs':>15}{'bf16 %':>8}{'GB':>9}{'compute ms':>12}"
             f"{'memory ms':>11}{'roofline ms':>13}  bound    what"]
    rows = list(report["components"].items()) + [("total", report["total"])]
    for name, row in rows:
        if name != "total" and row["tflop"] == 0 and row["gb"] <= 0:
            continue
        bf16 = row["tflop_by_precision"].get("bf16", 0.0) / row["tflop"] * 100 if row["tflop"] else 0.0
        bound = row["bound"] if name != "total" else "sum"
        lines.append(f"  {name:<14}{row['passes']:<9}{_fmt_flop(row['tflop']):>15}{bf16:>7.0f}%{row['gb']:>9.1f}"
                     f"{row['compute_ms']:>12.2f}{row['memory_ms']:>11.2f}{row['roofline_ms']:>13.2f}  "
                     f"{bound:<9}{COMPONENT_NOTES.get(name, '')}")
    return "\n".join(lines)


def format_top_ops(report: dict) -> str:
    lines = [f"stage {report['stage']}: aten ops moving the most bytes, per component (GB, TFLOP)"]
    for name, ops in report["top_ops_by_bytes"].items():
        if ops:
            lines.append(f"  {name:<14}" + ", ".join(f"{o['op']} {o['gb']:.1f}/{o['tflop']:.2f}" for o in ops[:6]))
    return "\n".join(lines)


def format_summary(reports: list[dict]) -> str:
    stages = [r["stage"] for r in reports]
    header = f"  {'roofline ms':<14}" + "".join(f"{'stage ' + str(s):>16}" for s in stages)
    lines = ["component × stage (roofline ms, bound)", header]
    for name in [*COMPONENTS, OTHER, "total"]:
        cells = []
        for report in reports:
            row = report["total"] if name == "total" else report["components"][name]
            if name != "total" and row["tflop"] == 0 and row["gb"] <= 0:
                cells.append(f"{'-':>16}")
            else:
                bound = "" if name == "total" else f" {row['bound'][:3]}"
                cells.append(f"{row['roofline_ms']:>12.2f}{bound:>4}")
        lines.append(f"  {name:<14}" + "".join(cells))
    return "\n".join(lines)


ASSUMPTIONS = """\
Counted on fake tensors, nothing computed. FLOPs: FlopCounterMode (matmul/conv/attention, 2 per MAC),
grouped-conv weight gradients corrected. Bytes: input + output of every aten op (unfused traffic, views
free). Dtypes: the trainer's bf16 autocast with CUDA's policy (matmuls/convs bf16, norms/softmax/losses
fp32), fp32 parameters, gradients, optimizer state and EMA; the losses with autocast off (fp32).
Attention in the connector and the teacher is muse_kernels' eager reference (maps materialized).
Peaks: bf16 {bf16:.0f} TFLOP/s and {bw:.1f} TB/s measured; TF32 {tf32:.0f} / FP32 {fp32:.0f} TFLOP/s derived
from datasheet ratios. fp32 convolutions at TF32 (cuDNN default), fp32 matmuls at {mm}."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="a shipped config (its family's stage configs are used per stage) or a YAML path")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--gpu", choices=sorted(PRESETS), default="h100", help="peak and bandwidth preset")
    parser.add_argument("--peak-tflops", type=float, help="bf16 matmul peak, TFLOP/s (overrides the preset)")
    parser.add_argument("--tf32-tflops", type=float, help="TF32 peak, TFLOP/s (overrides the preset)")
    parser.add_argument("--fp32-tflops", type=float, help="FP32 peak, TFLOP/s (overrides the preset)")
    parser.add_argument("--bandwidth-tbps", type=float, help="memory bandwidth, TB/s (overrides the preset)")
    parser.add_argument("--tf32-matmul", action="store_true",
                        help="count fp32 matmuls at the TF32 peak (torch.backends.cuda.matmul.allow_tf32=True)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--top-ops", action="store_true", help="print each component's aten ops moving the most bytes")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, key.sub=value (e.g. --set model.supervise=all)")
    args = parser.parse_args(argv)
    for name in ("batch", "image_size", "peak_tflops", "tf32_tflops", "fp32_tflops", "bandwidth_tbps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    preset = PRESETS[args.gpu]
    hw = Hardware(preset.name, args.peak_tflops or preset.bf16_tflops, args.tf32_tflops or preset.tf32_tflops,
                  args.fp32_tflops or preset.fp32_tflops, args.bandwidth_tbps or preset.bandwidth_tbps)
    reports = []
    for stage in sorted(set(args.stages)):
        started = time.perf_counter()
        try:
            count = count_stage(args.config, stage, args.batch, args.image_size, tf32_matmul=args.tf32_matmul,
                                overrides=args.overrides)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        report = stage_report(count, hw)
        report["counted_in_s"] = time.perf_counter() - started
        reports.append(report)
        print(format_stage(report) + "\n")
        if args.top_ops:
            print(format_top_ops(report) + "\n")
    if len(reports) > 1:
        print(format_summary(reports) + "\n")
    print(ASSUMPTIONS.format(bf16=hw.bf16_tflops, bw=hw.bandwidth_tbps, tf32=hw.tf32_tflops, fp32=hw.fp32_tflops,
                             mm="TF32" if args.tf32_matmul else "FP32 (allow_tf32 off)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": asdict(hw), "tf32_matmul": args.tf32_matmul, "overrides": args.overrides,
                       "stages": reports,
                       "assumptions": ASSUMPTIONS.splitlines()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
