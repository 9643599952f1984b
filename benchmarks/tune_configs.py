"""Time the Triton kernels' launch configurations: ``python -m benchmarks.tune_configs [--seq ...]``.

The kernels take their launch configurations from a committed table
(``muse_kernels/ops/launch_configs.json``, read by ``fwd_config``, ``maps_config``, ``bwd_config``)
so that every one is compiled ahead of time and checked against the shared-memory and spill limits.
This script times candidate configurations of each kernel family on the current GPU, launching the
kernels directly (no autograd, no dispatcher), checks that each candidate computes what the current
configuration does, and prints the fastest: the evidence for changing a configuration. With
``--write-table`` it also writes the fastest correct configuration per tuned N into the table (the
largest tuned N becomes the any-N entry), with the GPU and date as the entry's source; run
``python -m muse_kernels.aot`` afterwards to compile and check the new entries.
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
            setattr(ops, name, lambda head_dim, dt, seq, c=config: c)
            fn = runner(family, q, k, v, scale)
            try:
                got = fn()
            except Exception as error:  # noqa: BLE001 — a config the compiler rejects is a result
                rows.append(dict(family=family, config=config.__dict__, error=str(error).splitlines()[0][:160]))
                continue
            err = max((g.float() - r).abs().max().item() for g, r in zip(got, reference))
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5])
            rows.append(dict(family=family, config=config.__dict__, ms=ms, max_diff_vs_current=err,
                             current=config == current(shape[-1], dtype, shape[2])))
    finally:
        setattr(ops, name, current)
    return rows


def table_entries(results: list[dict], dtype_name: str, source: str, tolerance: float = 1e-2) -> list[dict]:
    """Table entries from tuning rows: per (family, head dim), the fastest candidate that matches the
    current configuration within ``tolerance`` at each tuned N; the largest N's entry covers any N."""
    best = {}
    for row in results:
        if "ms" not in row or row["max_diff_vs_current"] > tolerance:
            continue
        key = (row["family"], row["shape"][3], row["shape"][2])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    entries = []
    for family, dim in sorted({key[:2] for key in best}):
        seqs = sorted(seq for f, d, seq in best if (f, d) == (family, dim))
        for seq in seqs:
            config = best[(family, dim, seq)]["config"]
            entries.append(dict(kernel=family, variant="", head_dim=dim, dtype=dtype_name,
                                max_seq=None if seq == seqs[-1] else seq, **config, source=source))
    return entries


def write_table(path: str, entries: list[dict]) -> None:
    """Replaces the table's entries for every (kernel, variant, head dim, dtype) that ``entries`` cover."""
    with open(path) as f:
        table = json.load(f)
    covered = {(e["kernel"], e["variant"], e["head_dim"], e["dtype"]) for e in entries}
    kept = [e for e in table["entries"] if (e["kernel"], e["variant"], e["head_dim"], e["dtype"]) not in covered]
    table["entries"] = kept + entries
    lines = ",\n".join("  " + json.dumps(e) for e in table["entries"])
    with open(path, "w") as f:
        f.write('{\n "about": ' + json.dumps(table["about"]) + ',\n "entries": [\n' + lines + "\n ]\n}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(CANDIDATES), default=sorted(CANDIDATES))
    parser.add_argument("--seq", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--batch-heads", type=int, default=256, help="B·H (as B=B·H/8, H=8)")
    parser.add_argument("--out", help="write tune.json here")
    parser.add_argument("--write-table", action="store_true",
                        help=f"write the fastest correct configurations into {ops.LAUNCH_TABLE_PATH}")
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
    info = provenance(torch.device("cuda"), argv or sys.argv[1:], "benchmarks.tune_configs")
    if args.write_table:
        source = f"timed on {info['gpu']} by benchmarks.tune_configs, {info['date'][:10]}"
        entries = table_entries(results, {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype], source)
        write_table(str(ops.LAUNCH_TABLE_PATH), entries)
        log.info("wrote %d entries to %s; run python -m muse_kernels.aot to check them", len(entries),
                 ops.LAUNCH_TABLE_PATH)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump({"provenance": info, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
