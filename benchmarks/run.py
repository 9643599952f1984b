"""Run the benchmark suite: ``python -m benchmarks.run [--ops ...] [--shapes muse|sweep] [--out DIR]``.

All providers of an op are measured inside one process, against one measured copy bandwidth, and the
results are written as JSON and CSV (with provenance), a markdown table and PNG plots. ``--smoke``
runs the whole harness on CPU with tiny shapes in seconds: it checks the harness, not speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys

import torch

from benchmarks import bench_model, bench_synergistic_attention, bench_topology_kl_loss
from benchmarks.common import Result, copy_bandwidth_gbps, measure, provenance, write_results
from benchmarks.targets import check_targets, checks_as_rows, targets_markdown

log = logging.getLogger("benchmarks")

OPS = {module.OP: module for module in (bench_synergistic_attention, bench_topology_kl_loss, bench_model)}


def shape_set(name: str) -> list[dict]:
    if name == "muse":
        return [dict(B=32, H=8, N=n, D=64) for n in (64, 256)]
    if name == "sweep":
        return [dict(B=8, H=8, N=n, D=d) for d in (64, 128) for n in (64, 128, 256, 512, 1024, 2048, 4096)]
    if name == "smoke":
        return [dict(B=1, H=2, N=n, D=16) for n in (16, 33)]
    raise ValueError(f"unknown shape set {name!r}: muse, sweep or smoke")


def replot(out_dir: str) -> int:
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        log.error("--replot: %s does not exist", path)
        return 2
    with open(path) as f:
        saved = json.load(f)
    results = [Result(**row) for row in saved["results"]]
    paths = write_results(results, saved["provenance"], out_dir)
    log.info("rewrote %s", ", ".join(sorted(paths.values())))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def default_out_dir(info: dict) -> str:
    """``bench_results/<device>`` in the current folder: never inside the package's committed
    ``benchmarks/results`` (curated runs are copied there on purpose), and git-ignored when run from
    the repository root."""
    name = info.get("gpu") or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(os.getcwd(), "bench_results", slug)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    parser.add_argument("--shapes", choices=("muse", "sweep"), default="muse")
    parser.add_argument("--modes", nargs="+", help="subset of fwd, bwd, fwd+bwd (default: each op's own)")
    parser.add_argument("--providers", nargs="+", help="subset of providers (default: all of each op)")
    parser.add_argument("--variants", nargs="+", help="subset of variants (default: all of each op)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--out", help="output folder (default: ./bench_results/<gpu>, git-ignored)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the harness, not speed")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time CUDA graph replays of each step: the device's time without host overhead")
    parser.add_argument("--replot", metavar="DIR",
                        help="no measuring: rewrite DIR's table and plots from its results.json (any machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.replot:
        return replot(args.replot)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        log.error("no CUDA device: benchmarks need a GPU (use --smoke to check the harness on CPU)")
        return 2
    shape_name = "smoke" if args.smoke else args.shapes
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    info = provenance(device, argv if argv is not None else sys.argv[1:])
    info["copy_gbps"] = copy_bandwidth_gbps(device)
    info["cuda_graphs"] = args.cuda_graphs and device.type == "cuda"
    if info["copy_gbps"]:
        log.info("measured copy bandwidth: %.0f GB/s", info["copy_gbps"])

    all_cases = []
    for op in args.ops:
        module = OPS[op]
        modes = [m for m in (args.modes or module.MODES) if m in module.MODES]
        if info["cuda_graphs"] and "bwd" in modes:
            # A "bwd" step replays the backward of a forward recorded outside the capture, on the
            # default stream, which a capture cannot depend on: fwd+bwd covers it.
            log.info("--cuda-graphs: skipping the bwd mode of %s (fwd+bwd is measured)", op)
            modes.remove("bwd")
        providers = [p for p in (args.providers or module.PROVIDERS) if p in module.PROVIDERS]
        variants = [v for v in (args.variants or module.VARIANTS) if v in module.VARIANTS]
        # Ops with their own shapes (the model level) name them; the attention ops share one set.
        shapes = module.shape_set(shape_name) if hasattr(module, "shape_set") else shape_set(shape_name)
        all_cases += module.cases(shapes, dtype, device, providers, modes, variants)

    from tqdm import tqdm

    results = []
    # A lease that ends mid-run (SIGTERM from a time limit) still writes every case measured so far.
    signal.signal(signal.SIGTERM, _interrupt)
    log.info("measuring %d cases", len(all_cases))
    # Off a terminal (a device job's log) the bar draws nothing: a line per case shows the progress.
    log_cases = not sys.stderr.isatty()
    try:
        for number, case in enumerate(tqdm(all_cases, desc="benchmarks", unit="case", disable=None), 1):
            results.append(measure(case, device, info["copy_gbps"], reps=2 if args.smoke else 5,
                                   cuda_graphs=info["cuda_graphs"]))
            if log_cases:
                log.info("measured %d/%d: %s %s %s %s %s %s", number, len(all_cases), case.op, case.provider,
                         case.variant, case.mode, case.dtype, case.shape)
    except KeyboardInterrupt:
        log.warning("interrupted after %d of %d cases: writing those", len(results), len(all_cases))
        info["interrupted_after"] = f"{len(results)} of {len(all_cases)} cases"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the writing below takes seconds: let it finish
    out_dir = args.out or default_out_dir(info)
    paths = write_results(results, info, out_dir)
    checks = check_targets(results)
    paths["targets"] = os.path.join(out_dir, "targets.md")
    with open(paths["targets"], "w") as f:
        f.write(targets_markdown(checks))
    with open(os.path.join(out_dir, "targets.json"), "w") as f:
        json.dump({"provenance": info, "checks": checks_as_rows(checks)}, f, indent=1)
    for check in checks:
        if check.met is not None:
            log.info("target %-28s %-60s %.3g (%s): %s", check.target, check.case, check.measured, check.bound,
                     "met" if check.met else "MISSED")
    ok = sum(r.status == "ok" for r in results)
    log.info("%d cases: %d measured, %d skipped, %d out of memory", len(results), ok,
             sum(r.status == "skipped" for r in results), sum(r.status == "oom" for r in results))
    log.info("wrote %s", ", ".join(sorted(paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
