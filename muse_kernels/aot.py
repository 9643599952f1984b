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
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch

log = logging.getLogger("muse_kernels.aot")

# Largest dynamic shared memory a block may opt in to, in bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# Per-thread spill (local memory) an aligned, non-ieee variant may use. The single-pass kernel gets 0:
# its launch configs were chosen by this report. The other kernels' configs were timed on an H100
# (benchmarks.tune_configs) with their spills in; the worst is 1728 B (fp32 dK/dV at D = 64 on
# sm_80), most fp16/bf16 ones spill < 300 B. 2 KiB holds them all and fails on a regression past it;
# lower it as the GPU retune removes spills. ieee variants (fp32 without TF32: FMA dots, a
# correctness mode, 16 KB spills) and unaligned variants are reported, not budgeted.
SPILL_BUDGET_BYTES = 2048

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTN_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant. ``aligned``: every pointer 16-byte aligned and every ``stride_*`` argument
    a multiple of 16, the specialization Triton's JIT compiles for such inputs (MUSE's: fresh or
    packed-projection tensors with D = 64 and N a multiple of 16) and the one whose registers count.
    Unaligned variants run for other strides (N = 65 maps, odd views): compiled and reported too."""

    kernel: str
    pointer_dtypes: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    aligned: bool = False

    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        ptrs = ",".join(f"{k}:{v}" for k, v in self.pointer_dtypes)
        return f"{self.kernel}[{consts}|{ptrs}|w{self.num_warps}s{self.num_stages}{'|aligned' if self.aligned else ''}]"

    def launch_group(self) -> tuple:
        """What the compiler's code structure depends on besides pointer dtypes."""
        return self.kernel, self.constexprs, self.num_warps, self.num_stages, self.aligned


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
    """Every specialization the launchers in ``muse_kernels.ops`` can request: each unaligned, and
    MUSE's (GENERAL=False) also aligned (see ``KernelSpec``)."""
    specs = _unaligned_specs()
    return specs + [replace(s, aligned=True) for s in specs if ("GENERAL", True) not in s.constexprs]


def representative_specs(specs: list[KernelSpec]) -> list[KernelSpec]:
    """A subset that still compiles every launch group (kernel, constexprs, launch config, alignment)
    and every (kernel, pointer argument, dtype) and (kernel, input dtype, alignment) pair at least
    once: what remains out are variants that differ from a compiled one only in the dtype of an
    argument that is compiled with that dtype elsewhere in the same kernel (fp16 beside bf16 under
    the same constexprs, a bf16 teacher beside a bf16 map gradient). Aligned variants, whose spills
    are budgeted, keep every launch group in every input dtype. Greedy set cover, in spec order."""
    def features(spec):
        inputs = dict(spec.pointer_dtypes)["Q"]
        found = {("group", spec.launch_group()), ("input", spec.kernel, inputs, spec.aligned),
                 *(("pointer", spec.kernel, name, dtype) for name, dtype in spec.pointer_dtypes)}
        if spec.aligned:
            # The budgeted variants: registers depend on the input dtype, so each group in each one.
            found.add(("budgeted", spec.launch_group(), inputs))
        return found

    uncovered = set().union(*(features(s) for s in specs))
    chosen = []
    while uncovered:
        best = max(specs, key=lambda s: len(features(s) & uncovered))
        chosen.append(best)
        uncovered -= features(best)
    order = {s: i for i, s in enumerate(specs)}
    return sorted(chosen, key=order.__getitem__)


def _unaligned_specs() -> list[KernelSpec]:
    from muse_kernels.ops import synergistic_attention as sa

    specs = []
    for dim, dtype in itertools.product(sa.SUPPORTED_HEAD_DIMS, _INPUT_DTYPES):
        t = _TRITON_DTYPE[dtype]
        for precision in _precisions(dtype):
            # Without V the kernel computes only the LSE (and the per-head KL with a teacher).
            for cfg, has_v, teacher_dtype in itertools.product(
                    sa.table_configs("fwd", dim, dtype), (True, False), (None, *_ATTN_DTYPES)):
                teacher = "fp32" if teacher_dtype is None else _TRITON_DTYPE[teacher_dtype]
                specs.append(KernelSpec(
                    "_synergistic_attention_fwd_kernel",
                    (("Q", t), ("K", t), ("V", t if has_v else "fp32"), ("Out", t if has_v else "fp32"),
                     ("Lse", "fp32"), ("Teacher", teacher), ("RowLoss", "fp32"), ("Mask", "fp32")),
                    (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
                     ("HAS_V", has_v), ("TEACHER", teacher_dtype is not None), ("INPUT_PRECISION", precision),
                     *_MUSE),
                    cfg.num_warps, cfg.num_stages))
            for cfg in sa.table_configs("maps", dim, dtype):
                specs += _maps_specs(cfg, dim, t, precision, _MUSE, "fp32")
            if dtype in sa.SINGLE_PASS_DTYPES:
                specs += _single_pass_specs(sa, dim, dtype, precision)
            for cfg in sa.table_configs("bwd", dim, dtype):
                specs += _backward_specs(cfg, dim, t, precision)
            for mask in sa.MASK_KINDS:
                specs += _general_specs(sa, dim, dtype, precision, mask)
    return specs


def _maps_specs(cfg, dim: int, t: str, precision: str, general: tuple, mask_pointer: str) -> list[KernelSpec]:
    """Maps of either kind in either dtype; on the MUSE path also the head-mean loss's tail (fp32 map
    gradient, fp32 or bf16 teacher)."""
    paths = [(head_mean, attn_dtype, None) for head_mean, attn_dtype in itertools.product((False, True), _ATTN_DTYPES)]
    if general == _MUSE:
        paths += [(True, torch.float32, teacher_dtype) for teacher_dtype in _ATTN_DTYPES]
    return [KernelSpec(
        "_synergistic_attention_maps_kernel",
        (("Q", t), ("K", t), ("Lse", "fp32"), ("Attn", _TRITON_DTYPE[attn_dtype]), ("Mask", mask_pointer),
         ("Teacher", "fp32" if teacher_dtype is None else _TRITON_DTYPE[teacher_dtype]), ("RowLoss", "fp32")),
        (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
         ("HEAD_MEAN", head_mean), ("TEACHER", teacher_dtype is not None), ("INPUT_PRECISION", precision),
         *general),
        cfg.num_warps, cfg.num_stages)
        for head_mean, attn_dtype, teacher_dtype in paths]


# (HEAD_MEAN, HAS_V, TEACHER, map dtypes, teacher dtypes) of single-pass launches: attention with maps
# of either kind; head-mean maps without V; and the fused head-mean topology loss, with or without V,
# whose map tensor is its fp32 gradient.
_SINGLE_PASS_PATHS = (
    (False, True, False, _ATTN_DTYPES, (None,)), (True, True, False, _ATTN_DTYPES, (None,)),
    (True, False, False, (torch.float32,), (None,)),
    *((True, has_v, True, (torch.float32,), _ATTN_DTYPES) for has_v in (False, True)),
)


def _single_pass_specs(sa, dim: int, dtype: torch.dtype, precision: str) -> list[KernelSpec]:
    t = _TRITON_DTYPE[dtype]
    specs = []
    for key_tile in sa.SINGLE_PASS_KEY_TILES.get(dim, ()):
        for head_mean, has_v, teacher, attn_dtypes, teacher_dtypes in _SINGLE_PASS_PATHS:
            if teacher and key_tile not in sa.SINGLE_PASS_LOSS_KEY_TILES[dim]:
                continue
            cfg = sa.single_pass_config(key_tile, dim, dtype, head_mean, teacher)
            for attn_dtype, teacher_dtype in itertools.product(attn_dtypes, teacher_dtypes):
                specs.append(KernelSpec(
                    "_synergistic_attention_single_pass_kernel",
                    (("Q", t), ("K", t), ("V", t if has_v else "fp32"), ("Out", t if has_v else "fp32"),
                     ("Lse", "fp32"), ("Attn", _TRITON_DTYPE[attn_dtype]),
                     ("Teacher", "fp32" if teacher_dtype is None else _TRITON_DTYPE[teacher_dtype]),
                     ("RowLoss", "fp32")),
                    (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_KEYS", key_tile),
                     ("HEAD_MEAN", head_mean), ("HAS_V", has_v), ("TEACHER", teacher),
                     ("INPUT_PRECISION", precision)),
                    cfg.num_warps, cfg.num_stages))
    return specs


def _general_specs(sa, dim: int, dtype: torch.dtype, precision: str, mask: str) -> list[KernelSpec]:
    t, mask_pointer = _TRITON_DTYPE[dtype], _MASK_POINTER[mask]
    general = (("GENERAL", True), ("MASK", mask))
    specs = [KernelSpec(
        "_synergistic_attention_fwd_kernel",
        (("Q", t), ("K", t), ("V", t), ("Out", t), ("Lse", "fp32"), ("Teacher", "fp32"), ("RowLoss", "fp32"),
         ("Mask", mask_pointer)),
        (("HEAD_DIM", dim), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n), ("HAS_V", True),
         ("TEACHER", False), ("INPUT_PRECISION", precision), *general),
        cfg.num_warps, cfg.num_stages) for cfg in sa.table_configs("fwd", dim, dtype)]
    for cfg in sa.table_configs("maps", dim, dtype):
        specs += _maps_specs(cfg, dim, t, precision, general, mask_pointer)
    for cfg in sa.table_configs("bwd", dim, dtype):
        specs += _general_backward_specs(cfg, dim, t, precision, general, mask_pointer)
    return specs


def _general_backward_specs(cfg, dim: int, t: str, precision: str, general: tuple, mask_pointer: str) -> list[KernelSpec]:
    specs = []
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


def spill_budget_bytes(spec: KernelSpec) -> int | None:
    """Per-thread local memory (spill) a variant may use; None: reported, not budgeted."""
    constexprs = dict(spec.constexprs)
    if constexprs.get("INPUT_PRECISION") == "ieee" or not spec.aligned:
        return None
    return 0 if spec.kernel == "_synergistic_attention_single_pass_kernel" else SPILL_BUDGET_BYTES


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
    attrs = {}
    if spec.aligned:
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name in pointers or name.startswith("stride_")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    shared = compiled.metadata.shared
    resources = resource_usage(compiled.asm["cubin"])
    # The kernel parameters the code loads (PTX parameters are the non-constexpr arguments, in order).
    runtime_args = [name for name in fn.arg_names if name not in constexprs]
    loaded = {int(i) for i in re.findall(r"_param_(\d+)\]", compiled.asm["ptx"])}
    read = {runtime_args[i] for i in loaded if i < len(runtime_args)}
    budget = spill_budget_bytes(spec)
    return {"spec": spec.label(), "arch": arch, "shared_bytes": shared,
            "limit_bytes": SHARED_MEMORY_LIMIT[arch], "fits": shared <= SHARED_MEMORY_LIMIT[arch],
            "general_args_read": sorted(read & set(GENERAL_ONLY_ARGS)), **resources,
            "spill_budget_bytes": budget, "within_budget": budget is None or resources["spill_bytes"] <= budget}


_RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and per-thread local memory of a compiled kernel, read from the cubin the
    compile produced (``cuobjdump --dump-resource-usage``; no second ptxas run, and it works on Triton
    cache hits, where no ptxas log exists). Triton kernels declare no local arrays and do not recurse,
    so their stack frame is ptxas's spill space: ``spill_bytes`` = stack + local."""
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True)
    found = _RESOURCE_LINE.search(proc.stdout)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{proc.stdout[-2000:]}")
    registers, stack, _static_shared, local = (int(x) for x in found.groups())
    return {"registers": registers, "stack_bytes": stack, "local_bytes": local, "spill_bytes": stack + local}


def _compile_job(args):
    return compile_spec(*args)


def compile_all(archs=(80, 90), jobs: int | None = None, representative: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("muse_kernels.aot must run without TRITON_INTERPRET=1")
    specs = kernel_specs()
    if representative:
        specs = representative_specs(specs)
    work = [(spec, arch) for arch in archs for spec in specs]
    jobs = jobs or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--representative", action="store_true",
                        help="compile only representative_specs(): every launch group, pointer dtype and input dtype once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = compile_all(args.arch, args.jobs, args.representative)
    for r in results:
        budget = "-" if r["spill_budget_bytes"] is None else r["spill_budget_bytes"]
        log.info("sm_%d %6d / %6d B smem  %3d regs  %5d / %s B spill  %s  %s", r["arch"], r["shared_bytes"],
                 r["limit_bytes"], r["registers"], r["spill_bytes"], budget,
                 "ok " if r["fits"] and r["within_budget"] else "OVER", r["spec"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    over_shared = [r for r in results if not r["fits"]]
    over_budget = [r for r in results if not r["within_budget"]]
    log.info("%d configurations compiled, %d over the shared-memory limit, %d over their spill budget",
             len(results), len(over_shared), len(over_budget))
    return 1 if over_shared or over_budget else 0


if __name__ == "__main__":
    sys.exit(main())
