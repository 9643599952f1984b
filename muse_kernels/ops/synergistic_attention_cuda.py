"""Synergistic attention on the CUDA C++ backend (``csrc/``): the extension and its custom ops.

The same contract as the Triton ops (``synergistic_attention.py``, ``topology_kl_loss.py``): out,
per-head or head-mean maps (fp32 or bf16), shielded or ordinary backward, and the fused topology KL
(per head: three running sums, no map; head mean: through the (B, N, N) mean map), for fp32, fp16
and bf16 inputs with head dim 64 or 128. The extension is ``muse_kernels._C`` when ``setup.py`` built it; otherwise the first call on a
CUDA machine builds it from the ``csrc/`` sources with ``torch.utils.cpp_extension.load`` (ninja),
once per machine (torch caches the build).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from muse_kernels.ops.synergistic_attention import register_attention_ops
from muse_kernels.ops.topology_kl_loss import register_topology_kl_ops

log = logging.getLogger("muse_kernels")

CUDA_HEAD_DIMS = (64, 128)
CSRC = Path(__file__).resolve().parents[2] / "csrc"
_extension = None


def cuda_sources() -> list[Path]:
    return sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])


def load_extension():
    """The compiled backend: the prebuilt ``muse_kernels._C``, else a one-time JIT build."""
    global _extension
    if _extension is not None:
        return _extension
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' needs a CUDA GPU and a CUDA build of torch "
                           f"(torch {torch.__version__}, CUDA available: False)")
    try:
        from muse_kernels import _C  # built by setup.py
    except ImportError:
        _extension = _build()
    else:
        _extension = _C
    return _extension


def _build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = cuda_sources()
    if not sources:
        raise RuntimeError(f"backend='cuda': muse_kernels._C is not built and no CUDA sources are at {CSRC} "
                           "(install from a source checkout, or use backend='triton')")
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        raise RuntimeError("backend='cuda': muse_kernels._C is not built and nvcc is not found to build it "
                           "(set CUDA_HOME, or use backend='triton')")
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    log.warning("building the muse_kernels CUDA backend from %s for sm_%d%d (first use only; about a minute)...",
                CSRC, major, minor)
    return load(name="muse_kernels_cuda", sources=[str(s) for s in sources], extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)


def synergistic_attention_cuda_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float, map_mode: str = "none",
    attn_dtype: torch.dtype = torch.float32, teacher: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(out, attn, lse2, row_kl), as the Triton launcher returns them."""
    out, attn, lse, row_kl = load_extension().fwd(q, k, v, float(scale), map_mode, attn_dtype == torch.bfloat16,
                                                  teacher)
    return (None if v is None else out), (None if map_mode == "none" else attn), lse, \
        (None if teacher is None else row_kl)


def synergistic_attention_cuda_backward(
    grad_out: torch.Tensor | None, grad_attn: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor,
    scale: float, shield: bool = True,
    teacher: torch.Tensor | None = None, kl_grad: torch.Tensor | None = None, kl_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv), as the Triton launcher returns them (dv None without v)."""
    dq, dk, dv = load_extension().bwd(grad_out, grad_attn, q, k, v, out, lse, float(scale), shield, teacher,
                                      kl_grad, float(kl_scale))
    return dq, dk, (None if v is None else dv)


synergistic_attention_cuda = register_attention_ops(
    "synergistic_attention_cuda",
    lambda q, k, v, scale, map_mode, attn_dtype: synergistic_attention_cuda_forward(q, k, v, scale, map_mode,
                                                                                    attn_dtype)[:3],
    synergistic_attention_cuda_backward,
)
topology_kl_cuda = register_topology_kl_ops(
    "topology_kl_cuda", synergistic_attention_cuda_forward, synergistic_attention_cuda_backward
)
