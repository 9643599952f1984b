"""Time the Triton kernels' launch configurations: ``python -m benchmarks.tune_configs [--seq ...]``.

The kernels use fixed launch configurations (``fwd_config``, ``maps_config``, ``bwd_config`` in
``muse_kernels/ops/synergistic_attention.py``) so that every one is compiled ahead of time and
checked against the shared-memory limit. This script times candidate configurations of each kernel
family on the current GPU, launching the kernels directly (no autograd, no dispatcher), checks that
each candidate computes what the current configuration does, and prints the fastest: the evidence for
changing a configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from benchmarks.common import provenance
from muse_kernels.ops import synergistic_attention as ops

log = logging.getLogger("benchmarks")

CANDIDATES = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2),
            (128, 64, 8, 3), (128, 128, 8, 2)],
    "maps": [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
    "bwd": [(64, 64, 4, 1), (64, 64, 4, 2), (32, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 2), (128, 64, 8, 1),
            (64, 128, 8, 1)],
}
CONFIG_FUNCTIONS = {"fwd": "fwd_config", "maps": "maps_config", "bwd": "bwd_config"}


def runner(family: str, q, k, v, scale: float):
    """The launches a family's configuration governs, as a zero-argument function returning tensors."""
    if family == "fwd":
        return lambda: ops.synergistic_attention_forward(q, k, v, scale)[:1]
    if family == "maps":
        return lambda: ops.synergistic_attention_forward(q, k, v, scale, map_mode="per_head")[:2]
    out, _, lse, _ = ops.synergistic_attention_forward(q, k, v, scale)
    # Fixed gradients, so that every candidate is compared with the current one on the same inputs.
    gen = torch.Generator(device=q.device).manual_seed(1)
    grad_out = torch.randn(out.shape, device=q.device, dtype=out.dtype, generator=gen)
    grad_attn = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[2], device=q.device, dtype=torch.float32,
                            generator=gen)
    return lambda: ops.synergistic_attention_backward(grad_out, grad_attn, q, k, v, out, lse, scale)


def tune(family: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> list[dict]:
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    scale = shape[-1] ** -0.5
    name = CONFIG_FUNCTIONS[family]
    current = getattr(ops, name)
    reference = [t.float() for t in runner(family, q, k, v, scale)()]
    rows = []
    try:
        for block_m, block_n, warps, stages in CANDIDATES[family]:
            config = ops.LaunchConfig(block_m, block_n, warps, stages)
            setattr(ops, name, lambda head_dim, dt, c=config: c)
            fn = runner(family, q, k, v, scale)
            try:
                got = fn()
            except Exception as error:  # noqa: BLE001 — a config the compiler rejects is a result
                rows.append(dict(family=family, config=config.__dict__, error=str(error).splitlines()[0][:160]))
                continue
            err = max((g.float() - r).abs().max().item() for g, r in zip(got, reference))
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5])
            rows.append(dict(family=family, config=config.__dict__, ms=ms, max_diff_vs_current=err,
                             current=config == current(shape[-1], dtype)))
    finally:
        setattr(ops, name, current)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(CANDIDATES), default=sorted(CANDIDATES))
    parser.add_argument("--seq", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--batch-heads", type=int, default=256, help="B·H (as B=B·H/8, H=8)")
    parser.add_argument("--out", help="write tune.json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: tuning needs a GPU")
        return 2
    dtype = getattr(torch, args.dtype)
    results = []
    for family in args.families:
        for dim in args.head_dims:
            for seq in args.seq:
                shape = (args.batch_heads // 8, 8, seq, dim)
                rows = tune(family, shape, dtype)
                for row in rows:
                    row["shape"] = shape
                results += rows
                timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
                now = next((r for r in rows if r.get("current")), None)
                for r in timed:
                    c = r["config"]
                    log.info("%-4s %s %s: BLOCK_M=%3d BLOCK_N=%3d warps=%d stages=%d  %.4f ms  diff %.2e%s", family,
                             shape, args.dtype, c["block_m"], c["block_n"], c["num_warps"], c["num_stages"], r["ms"],
                             r["max_diff_vs_current"], "  (current)" if r.get("current") else "")
                for r in rows:
                    if "error" in r:
                        log.info("%-4s %s: %s failed: %s", family, shape, r["config"], r["error"])
                if timed and now:
                    log.info("%-4s %s: fastest %.4f ms vs current %.4f ms", family, shape, timed[0]["ms"], now["ms"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        info = provenance(torch.device("cuda"), argv or sys.argv[1:], "benchmarks.tune_configs")
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump({"provenance": info, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
