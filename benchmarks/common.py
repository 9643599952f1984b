"""Benchmark harness: timing, peak memory, copy bandwidth, provenance, and result files.

Every op script describes its cases as ``Case`` objects (a provider's step function plus its FLOP
and byte counts); ``measure`` times them in one process so providers are compared inside one run.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

log = logging.getLogger("benchmarks")

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Case:
    op: str
    provider: str
    variant: str
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    shape: dict
    dtype: str
    # Builds the inputs and returns the function to time; called once, outside the timed region.
    setup: Callable[[], Callable[[], object]]
    flops: float = 0.0
    bytes: float = 0.0
    images: int = 0  # images per call, for model-level throughput


@dataclass
class Result:
    op: str
    provider: str
    variant: str
    mode: str
    shape: dict
    dtype: str
    status: str = "ok"  # ok, oom, skipped, error
    reason: str = ""
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    bandwidth_fraction: float | None = None
    peak_mem_mb: float | None = None
    extra: dict = field(default_factory=dict)


def _time_cuda(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> tuple[float, float, float]:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return median, p20, p80


def sample_quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of measured times by linear interpolation between the sorted samples (the
    "inclusive" method): each lies between the fastest and the slowest sample. The default "exclusive"
    method extrapolates beyond them for few samples (2 timings gave a negative p20)."""
    if not samples:
        raise ValueError("no timing samples")
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[1], deciles[7]


def _time_cpu(fn: Callable[[], object], reps: int) -> tuple[float, float, float]:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sample_quantiles(samples)


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph; the returned function replays it. Replays cost one
    launch, so their time is the device's work alone, without the host's dispatch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(case: Case, device: torch.device, copy_gbps: float | None, reps: int = 5,
            warmup_ms: int = 25, rep_ms: int = 100, cuda_graphs: bool = False) -> Result:
    result = Result(case.op, case.provider, case.variant, case.mode, case.shape, case.dtype)
    try:
        fn = case.setup()
    except SkipCase as skip:
        result.status, result.reason = "skipped", str(skip)
        return result
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            result.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            median, p20, p80 = _time_cuda(cuda_graphed(fn) if cuda_graphs else fn, warmup_ms, rep_ms)
        else:
            median, p20, p80 = _time_cpu(fn, reps)
    except torch.OutOfMemoryError:
        result.status, result.reason = "oom", "out of memory"
        return result
    except (RuntimeError, ValueError) as error:
        # One provider failing at one shape is a result to report, not a reason to lose the run.
        log.exception("%s %s %s %s failed", case.op, case.provider, case.variant, case.mode)
        result.status, result.reason = "error", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return result
    result.ms_median, result.ms_p20, result.ms_p80 = median, p20, p80
    if case.flops:
        result.tflops = case.flops / (median * 1e-3) / 1e12
    if case.images:
        result.extra["img_per_s"] = case.images / (median * 1e-3)
    if case.bytes:
        result.gbps = case.bytes / (median * 1e-3) / 1e9
        if copy_gbps:
            result.bandwidth_fraction = result.gbps / copy_gbps
    return result


def build_cases(op: str, shapes: list[dict], dtype: torch.dtype, variants, modes, providers,
                make_step: Callable[[str, str, str, dict], Callable[[], object]],
                flops: Callable[[dict, str], float], bytes_moved: Callable[[dict, str, str], float]) -> list[Case]:
    """Every (shape, variant, mode, provider) of an op; ``make_step(provider, variant, mode, shape)``
    runs at setup time, so a provider that cannot run here is skipped, not fatal."""
    cases = []
    for shape in shapes:
        for variant in variants:
            for mode in modes:
                for provider in providers:
                    cases.append(Case(
                        op, provider, variant, mode, dict(shape), str(dtype).removeprefix("torch."),
                        lambda p=provider, v=variant, m=mode, s=shape: make_step(p, v, m, s),
                        flops=flops(shape, mode), bytes=bytes_moved(shape, variant, mode),
                    ))
    return cases


class SkipCase(Exception):
    """Raised by a case's setup when its provider cannot run here (the reason is recorded)."""


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 1024) -> float | None:
    """Measured device copy bandwidth (read + write bytes per second), the roofline for map writes."""
    if device.type != "cuda":
        return None
    n = megabytes * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    median, _, _ = _time_cuda(lambda: dst.copy_(src), 25, 200)
    del src, dst
    return 2 * n * 4 / (median * 1e-3) / 1e9


def provenance(device: torch.device, argv: list[str] | None = None, module: str = "benchmarks.run") -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), "-m", module, *(argv or sys.argv[1:])]),
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "host": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["driver"] = _nvidia_smi("driver_version")
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(field_name: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _fmt(value, digits=3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def write_results(results: list[Result], info: dict, out_dir: str) -> dict[str, str]:
    """JSON (with provenance), CSV, a markdown table and PNG plots; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [asdict(r) for r in results]
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "results.csv"),
             "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump({"provenance": info, "results": rows}, f, indent=1)
    columns = ["op", "provider", "variant", "mode", "shape", "dtype", "status", "reason", "ms_median", "ms_p20",
               "ms_p80", "tflops", "gbps", "bandwidth_fraction", "peak_mem_mb"]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + list(info))
        for r in rows:
            writer.writerow([_shape_label(r[c]) if c == "shape" else r[c] for c in columns] + list(info.values()))
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(results, info))
    paths.update(plot_results(results, info, out_dir))
    return paths


def markdown_table(results: list[Result], info: dict) -> str:
    head = (f"Device: {info.get('gpu') or info.get('cpu')}, driver {info.get('driver')}, torch {info['torch']}, "
            f"triton {info['triton']}, git {info['git_sha']}, {info['date']}\n"
            f"Command: `{info['command']}`\n")
    if info.get("cuda_graphs"):
        head += "Timing: CUDA graph replays (device time only, no host dispatch)\n"
    if info.get("copy_gbps"):
        head += f"Measured copy bandwidth: {info['copy_gbps']:.0f} GB/s\n"
    lines = [head, "| op | variant | mode | shape | dtype | provider | median ms (p20–p80) | TFLOP/s | GB/s "
             "(% copy) | img/s | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            timing = f"{r.status}: {r.reason}"
        else:
            timing = f"{r.ms_median:.3f} ({r.ms_p20:.3f}–{r.ms_p80:.3f})"
        bw = "" if r.gbps is None else f"{r.gbps:.0f}" + (
            f" ({100 * r.bandwidth_fraction:.0f} %)" if r.bandwidth_fraction else "")
        lines.append(f"| {r.op} | {r.variant} | {r.mode} | {_shape_label(r.shape)} | {r.dtype} | {r.provider} | "
                     f"{timing} | {_fmt(r.tflops)} | {bw} | {_fmt(r.extra.get('img_per_s'), 4)} | "
                     f"{_fmt(r.peak_mem_mb, 4)} |")
    return "\n".join(lines) + "\n"


# One colour per provider in every plot, so that plots can be compared at a glance.
_PROVIDER_ORDER = ("eager", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn2", "flash_attn3",
                   "flash_attn4", "ours", "cuda")


def _provider_color(provider: str) -> str:
    index = _PROVIDER_ORDER.index(provider) if provider in _PROVIDER_ORDER else len(_PROVIDER_ORDER)
    return f"C{index % 10}"


def plot_results(results: list[Result], info: dict, out_dir: str) -> dict[str, str]:
    """Time and peak memory against N, one line per provider, one figure per (op, variant, mode, D)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status == "ok":
            key = (r.op, r.variant, r.mode, r.dtype, r.shape.get("D"))
            groups.setdefault(key, []).append(r)
    paths = {}
    for (op, variant, mode, dtype, dim), rows in groups.items():
        if any("N" not in r.shape for r in rows) or len({r.shape["N"] for r in rows}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for provider in sorted({r.provider for r in rows}):
            pts = sorted((r.shape["N"], r.ms_median, r.peak_mem_mb) for r in rows if r.provider == provider)
            style = dict(marker="o", label=provider, color=_provider_color(provider))
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            if all(p[2] is not None for p in pts):
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
        if not axes[1].lines:
            axes[1].text(0.5, 0.5, "peak memory is measured on CUDA devices only", ha="center", va="center",
                         transform=axes[1].transAxes)
        for ax, ylabel in zip(axes, ("median time (ms)", "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            if ax.lines:
                ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{op} · {variant} · {mode} · {dtype} · D={dim} · {info.get('gpu') or info.get('cpu')}")
        fig.tight_layout()
        name = f"{op}_{variant}_{mode.replace('+', '')}_{dtype}_D{dim}.png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"plot:{name}"] = path
    return paths
