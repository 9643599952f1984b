"""Where a provider's time goes: ``python -m benchmarks.profile_kernels [--ops ...] [--providers ...]``.

``benchmarks.run`` reports one number per case; when a case is slow this separates the two usual
causes. For each case it reports the wall time per call (host and device together, as a training
loop sees it), the summed time of the GPU kernels per call (what faster kernels would save) and the
kernels that take it, from ``torch.profiler``. Wall time far above kernel time means the host
(Python dispatch, launches) is the bottleneck, not the kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import time

import torch

from benchmarks.common import SkipCase, provenance
from benchmarks.run import OPS, _interrupt, shape_set

log = logging.getLogger("benchmarks")


def wall_ms_per_call(fn, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def kernel_breakdown(fn, calls: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Summed kernel time per call (ms) and the kernels by total time: (name, ms per call, launches per call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.time_range.elapsed_us() / 1e3
            counts[event.name] += 1
    kernels = sorted(((name, ms / calls, counts[name] // calls) for name, ms in totals.items()),
                     key=lambda item: -item[1])
    return sum(totals.values()) / calls, kernels


def host_profile(fn, calls: int, top: int) -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_cases(args, device: torch.device, rows: list[dict]) -> None:
    """Profiles every selected case, appending one row per case to ``rows`` as it goes."""
    for op in args.ops:
        module = OPS[op]
        shapes = module.shape_set(args.shapes) if hasattr(module, "shape_set") else shape_set(args.shapes)
        providers = [p for p in args.providers if p in module.PROVIDERS]
        modes = [m for m in (args.modes or module.MODES) if m in module.MODES]
        variants = [v for v in (args.variants or module.VARIANTS) if v in module.VARIANTS]
        for case in module.cases(shapes, torch.bfloat16, device, providers, modes, variants):
            label = f"{case.op} · {case.variant} · {case.mode} · {case.shape} · {case.provider}"
            try:
                fn = case.setup()
            except SkipCase as skip:
                log.info("skip %s: %s", label, skip)
                continue
            try:
                for _ in range(3):
                    fn()
                wall = wall_ms_per_call(fn, args.calls)
                kernel_ms, kernels = kernel_breakdown(fn, args.calls)
            except (RuntimeError, ValueError):
                # One provider failing at one case is reported; the other cases still get profiled.
                log.exception("%s failed", label)
                continue
            if args.host_profile:
                log.info("%s: host time by function over %d calls\n%s", label, args.calls,
                         host_profile(fn, args.calls, args.host_profile))
            rows.append(dict(op=case.op, variant=case.variant, mode=case.mode, shape=case.shape,
                             provider=case.provider, wall_ms=wall, kernel_ms=kernel_ms,
                             kernels=[dict(name=n, ms=ms, launches=c) for n, ms, c in kernels]))
            top = "; ".join(f"{n[:60]} {ms * 1e3:.0f} µs ×{c}" for n, ms, c in kernels[:args.top])
            log.info("%s: wall %.3f ms, kernels %.3f ms (%d launches) — %s", label, wall, kernel_ms,
                     sum(c for _, _, c in kernels), top)


def write_profile(rows: list[dict], info: dict, out_dir: str, top: int = 4) -> dict[str, str]:
    """profile.json (rows with provenance) and profile.md (a table) in ``out_dir``; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "profile.json"), "markdown": os.path.join(out_dir, "profile.md")}
    with open(paths["json"], "w") as f:
        json.dump({"provenance": info, "rows": rows}, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(f"Device: {info.get('gpu')}, torch {info['torch']}, triton {info['triton']}, git {info['git_sha']}, "
                f"{info['date']}\nCommand: `{info['command']}`\n\n"
                "| op | variant | mode | shape | provider | wall ms/call | kernel ms/call | host µs/call | kernels |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            kernels = "<br>".join(f"`{k['name'][:70]}` {k['ms'] * 1e3:.1f} µs ×{k['launches']}"
                                  for k in r["kernels"][:top])
            shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
            f.write(f"| {r['op']} | {r['variant']} | {r['mode']} | {shape} | {r['provider']} | "
                    f"{r['wall_ms']:.3f} | {r['kernel_ms']:.3f} | {(r['wall_ms'] - r['kernel_ms']) * 1e3:.0f} | "
                    f"{kernels} |\n")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=["synergistic_attention", "topology_kl_loss"])
    parser.add_argument("--providers", nargs="+", default=["sdpa_flash", "ours", "cuda"])
    parser.add_argument("--modes", nargs="+")
    parser.add_argument("--variants", nargs="+")
    parser.add_argument("--shapes", choices=("muse", "sweep"), default="muse")
    parser.add_argument("--calls", type=int, default=20, help="calls per measurement, after 3 warm-up calls")
    parser.add_argument("--top", type=int, default=4, help="kernels listed per case")
    parser.add_argument("--host-profile", type=int, default=0, metavar="K",
                        help="also print the K Python functions with the most host time per case (cProfile)")
    parser.add_argument("--out", help="write profile.json and profile.md here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: profiling needs a GPU")
        return 2
    device = torch.device("cuda")
    info = provenance(device, argv if argv is not None else sys.argv[1:], "benchmarks.profile_kernels")
    rows = []
    # A time limit's SIGTERM still writes the cases profiled so far, as benchmarks.run does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        profile_cases(args, device, rows)
    except KeyboardInterrupt:
        log.warning("interrupted after %d cases: writing those", len(rows))
        info["interrupted_after"] = f"{len(rows)} cases"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.out:
        write_profile(rows, info, args.out, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
