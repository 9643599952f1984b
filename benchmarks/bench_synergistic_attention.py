"""Synergistic attention (attention + maps, shielded) across providers.

Providers: ``eager`` (the official code's way: logits, softmax, maps materialized, detached map times
V), ``sdpa_<backend>`` (PyTorch SDPA forced to one backend; with maps, the maps are recomputed
separately and the output is shielded by detaching q and k — what a user would otherwise do),
``flash_attn2``/``3``/``4`` (FlashAttention's generations when importable, no maps), ``ours`` (``muse_kernels``: Triton on CUDA,
the torch backend elsewhere) and ``cuda`` (the CUDA C++ backend, built on first use if needed).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import Case, SkipCase, build_cases
from muse_kernels import synergistic_attention
from muse_kernels.reference import attention_probs

OP = "synergistic_attention"
# variant → (return_attn, attn_dtype)
VARIANTS = {
    "no_maps": (None, torch.float32),
    "per_head_fp32": ("per_head", torch.float32),
    "per_head_bf16": ("per_head", torch.bfloat16),
    "head_mean_fp32": ("head_mean", torch.float32),
}
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
# FlashAttention generations: the module that exports each one's `flash_attn_func`.
FLASH_ATTN_MODULES = {"flash_attn2": "flash_attn", "flash_attn3": "flash_attn_interface",
                      "flash_attn4": "flash_attn.cute.interface"}
PROVIDERS = ("eager", *(f"sdpa_{b}" for b in SDPA_BACKENDS), *FLASH_ATTN_MODULES, "ours", "cuda")
MODES = ("fwd", "bwd", "fwd+bwd")


def ours_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def cuda_backend(device: torch.device) -> str:
    """"cuda" once the CUDA C++ backend is loaded (built on first use), else the case is skipped."""
    if device.type != "cuda":
        raise SkipCase("the CUDA C++ backend needs a CUDA device")
    from muse_kernels.ops.synergistic_attention_cuda import load_extension

    try:
        load_extension()
    except (RuntimeError, OSError) as err:
        raise SkipCase(f"the CUDA C++ backend is unavailable: {err}") from None
    return "cuda"


def make_qkv(shape: dict, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    """q, k, v as a model produces them: views of one packed (B, N, 3, H, D) projection."""
    bsz, heads, seq, dim = shape["B"], shape["H"], shape["N"], shape["D"]
    packed = torch.randn(bsz, seq, 3, heads, dim, device=device, dtype=dtype)
    q, k, v = (packed[:, :, i].transpose(1, 2).detach().requires_grad_(requires_grad) for i in range(3))
    return q, k, v


def _sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    member = getattr(SDPBackend, names[backend], None)
    if member is None:
        raise SkipCase(f"SDPA backend {backend} is not in this torch build")
    return sdpa_kernel([member])


def forward_fn(provider: str, return_attn: str | None, attn_dtype: torch.dtype,
               device: torch.device) -> Callable[..., list[torch.Tensor]]:
    """A function (q, k, v) → the tensors a training step backpropagates through."""
    if provider == "eager":
        def run(q, k, v):
            out, attn = synergistic_attention(q, k, v, return_attn=return_attn, attn_dtype=attn_dtype,
                                              backend="torch")
            return [out] if attn is None else [out, attn]
        return run
    if provider.startswith("sdpa_"):
        backend = provider.removeprefix("sdpa_")
        if device.type != "cuda" and backend != "math":
            raise SkipCase(f"SDPA {backend} needs a CUDA device")
        _sdpa_context(backend)  # raises SkipCase now if this torch lacks the backend

        def run(q, k, v):
            with _sdpa_context(backend):
                if return_attn is None:
                    return [F.scaled_dot_product_attention(q, k, v)]
                out = F.scaled_dot_product_attention(q.detach(), k.detach(), v)
            probs = attention_probs(q, k, q.shape[-1] ** -0.5)
            attn = probs if return_attn == "per_head" else probs.mean(1)
            return [out, attn.to(attn_dtype)]
        return run
    if provider in FLASH_ATTN_MODULES:
        if return_attn is not None:
            raise SkipCase("FlashAttention returns no attention maps")
        module = FLASH_ATTN_MODULES[provider]
        try:
            flash_attn_func = importlib.import_module(module).flash_attn_func
        except (ImportError, AttributeError) as err:
            raise SkipCase(f"{module}.flash_attn_func is not importable ({err})") from None
        if device.type != "cuda":
            raise SkipCase("FlashAttention needs a CUDA device")

        def run(q, k, v):
            result = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            # FA3 and FA4 also return the log-sum-exp.
            out = result[0] if isinstance(result, tuple) else result
            return [out.transpose(1, 2)]
        return run
    if provider in ("ours", "cuda"):
        backend = ours_backend(device) if provider == "ours" else cuda_backend(device)

        def run(q, k, v):
            out, attn = synergistic_attention(q, k, v, return_attn=return_attn, attn_dtype=attn_dtype,
                                              backend=backend)
            return [out] if attn is None else [out, attn]
        return run
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def timed_step(run: Callable, mode: str, shape: dict, dtype: torch.dtype, device: torch.device):
    """The zero-argument function to time for a mode, with its inputs built once."""
    q, k, v = make_qkv(shape, dtype, device, requires_grad=mode != "fwd")
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return run(q, k, v)
        return step
    outputs = run(q, k, v)
    grads = [torch.randn_like(o) for o in outputs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outputs, (q, k, v), grads, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(run(q, k, v), (q, k, v), grads, allow_unused=True)


def attention_flops(shape: dict, mode: str) -> float:
    fwd = 4.0 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["D"]
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def forward_bytes(shape: dict, dtype: torch.dtype, return_attn: str | None, attn_dtype: torch.dtype) -> float:
    """Bytes a map-writing forward must move at least: q, k, v read, out written, maps written."""
    bsz, heads, seq, dim = shape["B"], shape["H"], shape["N"], shape["D"]
    total = 4.0 * bsz * heads * seq * dim * dtype.itemsize
    if return_attn == "per_head":
        total += bsz * heads * seq * seq * attn_dtype.itemsize
    elif return_attn == "head_mean":
        total += bsz * seq * seq * attn_dtype.itemsize
    return total


def cases(shapes: list[dict], dtype: torch.dtype, device: torch.device, providers, modes, variants) -> list[Case]:
    def make_step(provider, variant, mode, shape):
        return_attn, attn_dtype = VARIANTS[variant]
        return timed_step(forward_fn(provider, return_attn, attn_dtype, device), mode, shape, dtype, device)

    def bytes_moved(shape, variant, mode):
        return forward_bytes(shape, dtype, *VARIANTS[variant]) if mode == "fwd" else 0.0

    return build_cases(OP, shapes, dtype, variants, modes, providers, make_step, attention_flops, bytes_moved)
