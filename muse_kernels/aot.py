"""Compile every kernel configuration ahead of time for sm_80 and sm_90, without a GPU.

The Triton interpreter forgives what the compiler does not (layouts, shared memory, dot shapes), so
every (kernel, specialization, launch config) the launchers can pick is compiled here for real GPU
targets, and its shared memory is checked against the target's limit.

    python -m muse_kernels.aot [--arch 80 90] [--jobs N] [--json out.json]

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels with Python objects).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger("muse_kernels.aot")

# Largest dynamic shared memory a block may opt in to, in bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTN_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class KernelSpec:
    kernel: str
    pointer_dtypes: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        ptrs = ",".join(f"{k}:{v}" for k, v in self.pointer_dtypes)
        return f"{self.kernel}[{consts}|{ptrs}|w{self.num_warps}s{self.num_stages}]"


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


# (OUT_TO_QK, HAS_DATTN, TEACHER) of the backward launches: attention with maps in the loss
# (shielded, or not with/without an output gradient), the per-head topology KL (alone or fused with
# attention), the head-mean KL (through the map gradient), and a plain unshielded backward.
_BWD_PATHS = ((False, True, False), (True, True, False), (True, False, False), (False, False, True))
# The general path (masks, causal, GQA, N_q != N_k) is unshielded, with an output gradient, and its
# map gradients in fp32 (the launcher casts): (OUT_TO_QK, HAS_DATTN) of its backward launches.
_GENERAL_BWD_PATHS = ((True, False), (True, True))
# Mask pointer dtype per mask kind; without a mask the launchers pass an fp32 placeholder.
_MASK_POINTER = {"none": "fp32", "bool": "u8", "additive": "fp32"}
_MUSE = (("GENERAL", False), ("MASK", "none"))
# Arguments only the general path reads: MUSE's specializations (GENERAL=False) must not load them.
GENERAL_ONLY_ARGS = ("Mask", "stride_mb", "stride_mh", "stride_mm", "stride_mn", "N_K", "kv_group", "causal_offset")


def kernel_specs() -> list[KernelSpec]:
    """Every specialization the launchers in ``muse_kernels.ops`` can request."""
    from muse_kernels.ops import synergistic_attention as sa

    specs = []
    for dim, dtype in itertools.product(sa.SUPPORTED_HEAD_DIMS, _INPUT_DTYPES):
        t = _TRITON_DTYPE[dtype]
        for precision in _precisions(dtype):
            cfg = sa.fwd_config(dim, dtype)
            # Without V the kernel computes only the LSE (and the per-head KL with a teacher).
            for has_v, teacher_dtype in itertools.product((True, False), (None, *_ATTN_DTYPES)):
                teacher = "fp32" if teacher_dtype is None else _TRITON_DTYPE[teacher_dtype]
                specs.append(KernelSpec(
                    "_synergistic_attention_fwd_kernel",
                    (("Q", t), ("K", t), ("V", t if has_v else "fp32"), ("Out", t if has_v else "fp32"),
                     ("Lse", "fp32"), ("Teacher", teacher), ("RowLoss", "fp32"), ("Mask", "fp32")),
                    (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
                     ("HAS_V", has_v), ("TEACHER", teacher_dtype is not None), ("INPUT_PRECISION", precision),
                     *_MUSE),
                    cfg.num_warps, cfg.num_stages))
            specs += _maps_specs(sa.maps_config(dim, dtype), dim, t, precision, _MUSE, "fp32")
            specs += _backward_specs(sa.bwd_config(dim, dtype), dim, t, precision)
            for mask in sa.MASK_KINDS:
                specs += _general_specs(sa, dim, dtype, precision, mask)
    return specs


def _maps_specs(cfg, dim: int, t: str, precision: str, general: tuple, mask_pointer: str) -> list[KernelSpec]:
    return [KernelSpec(
        "_synergistic_attention_maps_kernel",
        (("Q", t), ("K", t), ("Lse", "fp32"), ("Attn", _TRITON_DTYPE[attn_dtype]), ("Mask", mask_pointer)),
        (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
         ("HEAD_MEAN", head_mean), ("INPUT_PRECISION", precision), *general),
        cfg.num_warps, cfg.num_stages)
        for head_mean, attn_dtype in itertools.product((False, True), _ATTN_DTYPES)]


def _general_specs(sa, dim: int, dtype: torch.dtype, precision: str, mask: str) -> list[KernelSpec]:
    t, mask_pointer = _TRITON_DTYPE[dtype], _MASK_POINTER[mask]
    general = (("GENERAL", True), ("MASK", mask))
    cfg = sa.fwd_config(dim, dtype)
    specs = [KernelSpec(
        "_synergistic_attention_fwd_kernel",
        (("Q", t), ("K", t), ("V", t), ("Out", t), ("Lse", "fp32"), ("Teacher", "fp32"), ("RowLoss", "fp32"),
         ("Mask", mask_pointer)),
        (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n), ("HAS_V", True),
         ("TEACHER", False), ("INPUT_PRECISION", precision), *general),
        cfg.num_warps, cfg.num_stages)]
    specs += _maps_specs(sa.maps_config(dim, dtype), dim, t, precision, general, mask_pointer)
    cfg = sa.bwd_config(dim, dtype)
    blocks = (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n))
    extra = (("dAttn", "fp32"), ("Teacher", "fp32"), ("TeacherRowSum", "fp32"), ("KlGrad", "fp32"),
             ("Lse", "fp32"), ("Delta", "fp32"))
    for out_to_qk, has_dattn in _GENERAL_BWD_PATHS:
        flags = (("OUT_TO_QK", out_to_qk), ("HAS_DATTN", has_dattn), ("TEACHER", False))
        specs.append(KernelSpec(
            "_synergistic_attention_bwd_dq_kernel",
            (("Q", t), ("K", t), ("V", t), ("Out", t), ("dOut", t), *extra, ("dQ", t), ("Mask", mask_pointer)),
            (*blocks, *flags, ("INPUT_PRECISION", precision), *general), cfg.num_warps, cfg.num_stages))
        specs.append(KernelSpec(
            "_synergistic_attention_bwd_dkdv_kernel",
            (("Q", t), ("K", t), ("V", t), ("dOut", t), *extra, ("dK", t), ("dV", t), ("Mask", mask_pointer)),
            (*blocks, *flags, ("COMPUTE_DK", True), ("COMPUTE_DV", True), ("INPUT_PRECISION", precision),
             *general), cfg.num_warps, cfg.num_stages))
    return specs


def _backward_specs(cfg, dim: int, t: str, precision: str) -> list[KernelSpec]:
    specs = []
    blocks = (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n))
    # A shielded backward whose maps carry no gradient runs only the dK/dV kernel, for dV.
    for out_to_qk, has_dattn, teacher in (*_BWD_PATHS, (False, False, False)):
        compute_dk = out_to_qk or has_dattn or teacher
        for side_dtype in _ATTN_DTYPES if (has_dattn or teacher) else (torch.float32,):
            side = _TRITON_DTYPE[side_dtype]
            dattn, teacher_t = (side if has_dattn else "fp32"), (side if teacher else "fp32")
            flags = (("OUT_TO_QK", out_to_qk), ("HAS_DATTN", has_dattn), ("TEACHER", teacher))
            extra = (("dAttn", dattn), ("Teacher", teacher_t), ("TeacherRowSum", "fp32"), ("KlGrad", "fp32"),
                     ("Lse", "fp32"), ("Delta", "fp32"))
            if compute_dk:
                specs.append(KernelSpec(
                    "_synergistic_attention_bwd_dq_kernel",
                    (("Q", t), ("K", t), ("V", t), ("Out", t), ("dOut", t), *extra, ("dQ", t), ("Mask", "fp32")),
                    (*blocks, *flags, ("INPUT_PRECISION", precision), *_MUSE), cfg.num_warps, cfg.num_stages))
            # dV is skipped when the output carries no gradient (a loss on the maps only).
            for compute_dv in (True,) if (out_to_qk or not compute_dk) else (True, False):
                specs.append(KernelSpec(
                    "_synergistic_attention_bwd_dkdv_kernel",
                    (("Q", t), ("K", t), ("V", t), ("dOut", t), *extra, ("dK", t), ("dV", t), ("Mask", "fp32")),
                    (*blocks, *flags, ("COMPUTE_DK", compute_dk), ("COMPUTE_DV", compute_dv),
                     ("INPUT_PRECISION", precision), *_MUSE), cfg.num_warps, cfg.num_stages))
    return specs


def _scalar_type(name: str) -> str:
    if name.startswith("stride_") or name in ("H", "N", "N_K", "kv_group", "causal_offset"):
        return "i32"
    return "fp32"


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from muse_kernels.ops import synergistic_attention as sa

    fn = getattr(sa, spec.kernel)
    pointers, constexprs = dict(spec.pointer_dtypes), dict(spec.constexprs)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = _scalar_type(name)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    shared = compiled.metadata.shared
    # The kernel parameters the code loads (PTX parameters are the non-constexpr arguments, in order).
    runtime_args = [name for name in fn.arg_names if name not in constexprs]
    loaded = {int(i) for i in re.findall(r"_param_(\d+)\]", compiled.asm["ptx"])}
    read = {runtime_args[i] for i in loaded if i < len(runtime_args)}
    return {"spec": spec.label(), "arch": arch, "shared_bytes": shared,
            "limit_bytes": SHARED_MEMORY_LIMIT[arch], "fits": shared <= SHARED_MEMORY_LIMIT[arch],
            "general_args_read": sorted(read & set(GENERAL_ONLY_ARGS))}


def _compile_job(args):
    return compile_spec(*args)


def compile_all(archs=(80, 90), jobs: int | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("muse_kernels.aot must run without TRITON_INTERPRET=1")
    work = [(spec, arch) for arch in archs for spec in kernel_specs()]
    jobs = jobs or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = compile_all(args.arch, args.jobs)
    for r in results:
        log.info("sm_%d %6d / %6d B  %s  %s", r["arch"], r["shared_bytes"], r["limit_bytes"],
                 "ok " if r["fits"] else "OVER", r["spec"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [r for r in results if not r["fits"]]
    log.info("%d configurations compiled, %d over the shared-memory limit", len(results), len(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
