"""A ``"muse"`` attention implementation for Hugging Face transformers.

    import muse_kernels.integrations.transformers as muse_hf
    muse_hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="muse")   # or model.set_attn_implementation("muse")

The model then runs the Triton kernels (``backend="auto"``: Triton on CUDA tensors, the torch reference
elsewhere) and returns attention weights exactly when transformers asks for them
(``output_attentions=True``: per-head weights in the query dtype, as its eager path returns them);
otherwise no map is written. :func:`muse_kernels.capture_attention` picks maps for chosen layers only.

Contract, as transformers' attention functions have it (``sdpa_attention_forward`` and each model's
``eager_attention_forward`` are the references): ``(module, query, key, value, attention_mask,
dropout=0.0, scaling=None, is_causal=None, **kwargs) -> (attn_output (B, N_q, H, D), attn_weights or
None)``, query (B, H, N_q, D), key/value (B, H_kv, N_k, D) with H a multiple of H_kv (grouped-query
attention, read without repeating the kv heads).

Masks: ``register`` gives "muse" transformers' sdpa mask builder, so the model hands over a boolean
(B, 1, N_q, N_k) mask (True = attend), or None where the mask is only causal (then, as in SDPA, the
module's ``is_causal`` decides). A float 4-D mask a user passes is added to the logits. Causal masks
are bottom-right aligned (query i is position N_k − N_q + i, as transformers places queries after a KV
cache); the one top-left case transformers relies on SDPA for (a static cache's empty prefill:
no mask, N_k > N_q) is handled as SDPA does, by dropping the keys past N_q. Rows whose every key is
masked (left padding) attend uniformly to every key, as in transformers' eager attention.

Gradients are ordinary (unshielded) attention gradients, through outputs and returned maps alike.
Dropout is supported at p = 0 only: training with attention dropout raises.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from muse_kernels.capture import active_requests
from muse_kernels.functional import synergistic_attention
from muse_kernels.ops.synergistic_attention import SUPPORTED_HEAD_DIMS

log = logging.getLogger("muse_kernels.integrations.transformers")

NAME = "muse"
BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def register(name: str = NAME, backend: str | None = None) -> None:
    """Register the attention function (and transformers' sdpa mask builder) under ``name``.

    ``backend``: ``"auto"`` (the default: Triton on CUDA, the torch reference elsewhere), ``"triton"``
    (CPU tensors only under ``TRITON_INTERPRET=1``) or ``"torch"``; None keeps the current choice."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    global _backend
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _backend = backend
    AttentionInterface.register(name, muse_attention_forward)
    # Without a mask builder registered under the name, transformers would build no mask at all.
    AttentionMaskInterface.register(name, sdpa_mask)


def ensure_registered() -> None:
    """``register()`` unless ``"muse"`` is registered already (keeps the backend choice)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS or NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        register()


def _kernel_head_dim(dim: int) -> int | None:
    """The supported head dim a head dim of ``dim`` is zero-padded to, or None when too large."""
    return next((d for d in SUPPORTED_HEAD_DIMS if d >= dim), None)


def _backend_for(query: torch.Tensor) -> str:
    if _backend == "torch" or query.dtype == torch.float64:
        return "torch"
    if _backend == "auto" and query.device.type != "cuda":
        return "torch"
    if _kernel_head_dim(query.shape[-1]) is None:
        log.warning("head dim %d is above the kernels' largest (%d): running the torch reference",
                    query.shape[-1], SUPPORTED_HEAD_DIMS[-1])
        return "torch"
    return "triton" if _backend == "auto" else _backend


def _records_attentions() -> bool:
    """Whether the running model's ``output_attentions`` recorder is collecting attention weights: the
    ground truth, also for models that do not pass ``output_attentions`` down to their layers
    (InternVL's vision tower does not)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without the recorder: only the flags below tell
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _wants_output_attentions(kwargs: dict) -> bool:
    return bool(kwargs.get("output_attentions")) or _records_attentions()


def muse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract (see the module docstring)."""
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"the 'muse' attention does not support `{unsupported}`; use attn_implementation='eager'")
    if dropout and module.training:
        raise ValueError(f"the 'muse' attention supports dropout only at p = 0 in training mode, got p = {dropout} "
                         f"({type(module).__name__}); set the config's attention dropout to 0 or use eval()")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, k_len = query.shape[2], key.shape[2]

    # Exactly SDPA's reading of the arguments (transformers builds the masks for it): without a mask,
    # the module's causality applies to prefill only; a one-token query sees every key.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and is_causal)
    dropped_keys = 0
    if causal and k_len > q_len:
        # A static cache's empty prefill: SDPA's top-left causal mask hides the keys past N_q.
        dropped_keys = k_len - q_len
        key, value = key[:, :, :q_len], value[:, :, :q_len]

    per_head = _wants_output_attentions(kwargs)
    captures = active_requests(module)
    return_attn = None
    if per_head or any(kind == "per_head" for _, kind, _ in captures):
        return_attn = "per_head"
    elif captures:
        return_attn = "head_mean"
    # The kernels write fp32 or bf16 maps: bf16 when every consumer wants bf16.
    wanted = [query.dtype] * per_head + [dtype for _, _, dtype in captures]
    attn_dtype = torch.bfloat16 if wanted and all(d == torch.bfloat16 for d in wanted) else torch.float32

    backend = _backend_for(query)
    dim = query.shape[-1]
    padded_dim = dim if backend == "torch" else _kernel_head_dim(dim)
    if padded_dim != dim:
        # Zero-padding the head dim leaves q·kᵀ unchanged (the scale is passed explicitly) and gives
        # output columns of zeros, sliced off below.
        query, key, value = (F.pad(x, (0, padded_dim - dim)) for x in (query, key, value))
    out, attn = synergistic_attention(query, key, value, scale=float(scaling), return_attn=return_attn,
                                      attn_dtype=attn_dtype, shield=False, backend=backend,
                                      attn_mask=attention_mask, causal=causal)
    out = out[..., :dim]
    if attn is not None and dropped_keys:
        attn = F.pad(attn, (0, dropped_keys))

    for capture, kind, dtype in captures:
        if kind == "per_head":
            capture.store(module, attn.to(dtype))
        else:
            capture.store(module, (attn.mean(1) if attn.dim() == 4 else attn).to(dtype))
    weights = attn.to(query.dtype) if per_head else None
    # The kernels store (B, H, N, D) as (B, N, H, D): the transpose is transformers' layout, no copy.
    return out.transpose(1, 2).contiguous(), weights

