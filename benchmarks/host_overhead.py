"""Our Python's share of an eager call's host time: ``python -m benchmarks.host_overhead``.

On a GPU, ``benchmarks.profile_kernels`` measures wall − kernel time per call; that difference mixes
our wrappers (checks, allocation, autograd node, launcher arguments) with Triton's launch path and
the driver. This script isolates the first part, on any machine: the Triton kernels are replaced by
stand-ins that accept the launch and do nothing, the public API runs on CPU tensors (under
``TRITON_INTERPRET=1``, the only way the ``triton`` backend takes them) and each call is timed. It
also times a floor: an autograd node that allocates the same outputs and does nothing else.
Numbers are for the machine it runs on; compare them within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger("benchmarks")

KERNEL_NAMES = ("_synergistic_attention_fwd_kernel", "_synergistic_attention_maps_kernel",
                "_synergistic_attention_single_pass_kernel", "_synergistic_attention_bwd_dq_kernel",
                "_synergistic_attention_bwd_dkdv_kernel")


class _NoLaunch:
    """Takes ``kernel[grid](*args, **kwargs)`` and launches nothing; counts the launches."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@contextlib.contextmanager
def kernels_stubbed() -> Iterator[dict[str, _NoLaunch]]:
    from muse_kernels.ops import synergistic_attention as op

    saved = {name: getattr(op, name) for name in KERNEL_NAMES}
    stubs = {name: _NoLaunch() for name in KERNEL_NAMES}
    try:
        for name, stub in stubs.items():
            setattr(op, name, stub)
        yield stubs
    finally:
        for name, kernel in saved.items():
            setattr(op, name, kernel)


class _Floor(torch.autograd.Function):
    """One autograd node allocating an attention call's outputs (out, LSE): the least any wrapper pays."""

    @staticmethod
    def forward(ctx, q, k, v):
        bsz, heads, seq, dim = q.shape
        out = v.new_empty(bsz, seq, heads, dim).transpose(1, 2)
        lse = torch.empty(bsz, heads, seq, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


def time_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean µs per call."""
    for _ in range(max(calls // 10, 5)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def cases(shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Training calls (inputs require grad: an autograd node is built) and inference calls."""
    from muse_kernels import synergistic_attention, topology_kl_loss
    from muse_kernels.ops.synergistic_attention import synergistic_attention_forward

    q = torch.zeros(shape, dtype=dtype)
    qt = q.clone().requires_grad_()
    bsz, _, seq, _ = shape
    teacher = torch.full((bsz, seq, seq), 1.0 / seq)
    return {
        "floor: one autograd node + output allocation": lambda: _Floor.apply(qt, qt, qt),
        "launcher only (synergistic_attention_forward)": lambda: synergistic_attention_forward(
            q, q, q, 0.125, "none", torch.float32),
        "training: synergistic_attention, no maps": lambda: synergistic_attention(qt, qt, qt, backend="triton"),
        "training: synergistic_attention, per-head maps": lambda: synergistic_attention(
            qt, qt, qt, return_attn="per_head", backend="triton"),
        "training: synergistic_attention, head-mean maps": lambda: synergistic_attention(
            qt, qt, qt, return_attn="head_mean", backend="triton"),
        "training: topology_kl_loss, head mean (validate=False)": lambda: topology_kl_loss(
            qt, qt, teacher, validate=False, backend="triton"),
        "inference: synergistic_attention, no maps": lambda: synergistic_attention(q, q, q, backend="triton"),
        "inference: synergistic_attention, head-mean maps": lambda: synergistic_attention(
            q, q, q, return_attn="head_mean", backend="triton"),
    }


def measure(shape=(2, 8, 256, 64), dtype=torch.bfloat16, calls: int = 500, repeats: int = 5) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("run with TRITON_INTERPRET=1: the triton backend takes CPU tensors only under the "
                           "interpreter (no kernel runs here: they are stubbed)")
    rows = []
    with kernels_stubbed() as stubs:
        for name, fn in cases(shape, dtype).items():
            before = sum(s.launches for s in stubs.values())
            fn()
            launches = sum(s.launches for s in stubs.values()) - before
            rows.append({"case": name, "us_per_call": time_call(fn, calls, repeats), "launches": launches})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = measure(calls=args.calls, repeats=args.repeats)
    print("| case | µs per call (median) | kernel launches |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['us_per_call']:.1f} | {r['launches']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "python": sys.version.split()[0]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
