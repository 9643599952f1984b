"""Attention maps of chosen layers of a transformers model, without touching its code.

    with muse_kernels.capture_attention(model, layers=[-1], kind="head_mean") as maps:
        model(pixel_values)
    maps[-1]          # (B, N_q, N_k) head mean of the last attention layer; maps[0] is None

Inside the block the model runs the ``"muse"`` attention (``muse_kernels.integrations.transformers``;
the block switches a model on another implementation to it and back), the chosen layers write their
maps (one map write each, ``head_mean`` H times smaller than ``per_head``) and every other layer
writes none. ``output_attentions=True`` keeps its meaning: per-head weights of every layer in the
model's output, as transformers' eager attention returns them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import nn

CAPTURE_KINDS = ("head_mean", "per_head")
_ACTIVE: ContextVar[tuple[AttentionCapture, ...]] = ContextVar("muse_kernels_attention_captures", default=())


class AttentionCapture:
    """Maps of the chosen attention layers, by layer index (``None`` for layers not chosen or not run).

    ``maps`` lists one entry per attention layer of the model, in module order; ``capture[i]`` is
    ``maps[i]`` (negative indices count from the end); ``layers`` holds the chosen indices. A layer run
    more than once inside the block keeps its last map."""

    def __init__(self, modules: Sequence[nn.Module], layers: Sequence[int], kind: str, dtype: torch.dtype):
        self.kind, self.dtype = kind, dtype
        self.layers = tuple(layers)
        self.maps: list[torch.Tensor | None] = [None] * len(modules)
        # A recorded attention module may delegate to a child that calls the attention function.
        self._slots = {id(sub): layer for layer in self.layers for sub in modules[layer].modules()}

    def watches(self, module: nn.Module) -> bool:
        return id(module) in self._slots

    def store(self, module: nn.Module, attn: torch.Tensor) -> None:
        self.maps[self._slots[id(module)]] = attn

    def __getitem__(self, layer: int) -> torch.Tensor | None:
        return self.maps[layer]

    def __len__(self) -> int:
        return len(self.maps)


def active_requests(module: nn.Module) -> list[tuple[AttentionCapture, str, torch.dtype]]:
    """(capture, kind, dtype) of every active capture that wants this module's map."""
    captures = _ACTIVE.get()
    return [(c, c.kind, c.dtype) for c in captures if c.watches(module)] if captures else []


def _recorders(model: nn.Module) -> list:
    from transformers.utils.output_capturing import OutputRecorder

    specs = getattr(model, "_can_record_outputs", None) or {}
    entries = specs.get("attentions")
    if entries is None:
        return []
    recorders = []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, OutputRecorder):
            entry = OutputRecorder(target_class=None if isinstance(entry, str) else entry, index=1,
                                   class_name=entry if isinstance(entry, str) else None)
        # Index 1 of the module's output is what transformers records as the attention weights.
        if entry.index == 1:
            recorders.append(entry)
    return recorders


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose second output transformers records as ``attentions``, in module order, from
    the ``_can_record_outputs`` of every transformers model inside ``model``."""
    from transformers import PreTrainedModel

    found: dict[int, nn.Module] = {}
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        for recorder in _recorders(sub):
            for name, module in sub.named_modules():
                matches = ((recorder.target_class is not None and isinstance(module, recorder.target_class))
                           or (recorder.class_name is not None and name.endswith(recorder.class_name)))
                if matches and (recorder.layer_name is None or f".{recorder.layer_name.strip('.')}." in f".{name}."):
                    found[id(module)] = module
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(found.values(), key=lambda m: order[id(m)])


def _resolve_layers(layers: Sequence[int] | int, count: int) -> list[int]:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be a non-empty sequence of ints, got {layers!r}")
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold ints, got {layer!r}")
        if not -count <= layer < count:
            raise ValueError(f"layer {layer} is out of range: the model has {count} attention layers")
        resolved.append(layer % count)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers {list(layers)} name a layer twice")
    return resolved


def _outer_transformers_models(model: nn.Module) -> list:
    from transformers import PreTrainedModel

    outer, prefixes = [], []
    for name, sub in model.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(p) for p in prefixes):
            outer.append(sub)
            prefixes.append(f"{name}." if name else "")
    return outer


@contextlib.contextmanager
def _muse_attention(model: nn.Module, name: str) -> Iterator[None]:
    """Run every transformers model inside ``model`` on the ``name`` attention, restoring afterwards."""
    from transformers import PreTrainedModel

    switched = []
    try:
        for outer in _outer_transformers_models(model):
            previous = outer.config._attn_implementation
            if previous == name:
                continue
            inner = {m.config._attn_implementation for m in outer.modules() if isinstance(m, PreTrainedModel)}
            if len(inner) > 1:
                raise ValueError(f"{type(outer).__name__} mixes attention implementations {sorted(map(str, inner))}: "
                                 f"set attn_implementation='{name}' on it before capture_attention")
            outer.set_attn_implementation(name)
            switched.append((outer, previous))
        yield
    finally:
        for outer, previous in reversed(switched):
            outer.set_attn_implementation(previous)


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: Sequence[int] | int = (-1,), kind: str = "head_mean",
                      dtype: torch.dtype = torch.float32) -> Iterator[AttentionCapture]:
    """Attention maps of the chosen ``layers`` of a transformers ``model`` (or a module holding one),
    for the forward passes run inside the block.

    Args:
        model: a transformers model, or any module containing transformers models; its attention
            layers are the modules transformers records ``attentions`` from, in module order.
        layers: indices into those layers (negative from the end).
        kind: ``"head_mean"`` → (B, N_q, N_k), ``"per_head"`` → (B, H, N_q, N_k), softmax weights as
            transformers' eager attention computes them (masked, causal, fully masked rows uniform).
        dtype: dtype of the returned maps (written directly in bf16 when all consumers want bf16,
            else in fp32 and cast).

    Yields:
        an :class:`AttentionCapture`, filled as the chosen layers run. The maps carry autograd
        history like any output (ordinary attention gradients).
    """
    from muse_kernels.integrations import transformers as hf

    if kind not in CAPTURE_KINDS:
        raise ValueError(f"kind must be one of {CAPTURE_KINDS}, got {kind!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    modules = attention_layers(model)
    if not modules:
        raise ValueError(f"found no attention layers in {type(model).__name__}: capture_attention needs a "
                         "transformers model whose `_can_record_outputs` names its attention modules")
    capture = AttentionCapture(modules, _resolve_layers(layers, len(modules)), kind, dtype)
    hf.ensure_registered()
    token = _ACTIVE.set((*_ACTIVE.get(), capture))
    try:
        with _muse_attention(model, hf.NAME):
            yield capture
    finally:
        _ACTIVE.reset(token)
