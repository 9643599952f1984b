"""The product's speed and memory targets (issue 19's table), checked against one run's results.

Every check compares providers measured in the same run on the same shape. A check whose cases were
not measured (skipped provider, CPU run, other shapes) is reported as such, never as met.

| row | target | cases |
|---|---|---|
| `bandwidth` | map-writing forward at N ≥ 256: ≥ 75 % of the measured copy bandwidth | `synergistic_attention` · map variants · fwd · ours |
| `loss_per_head_vs_flash` | fused per-head loss, fwd+bwd, N = 256: ≤ 1.25× SDPA flash's time | `topology_kl_loss` · `attn+kl_per_head` · ours vs sdpa_flash |
| `loss_head_mean_vs_flash` | fused head-mean loss, fwd+bwd, N = 64 / 256: ≤ 1.4× SDPA flash's time | `topology_kl_loss` · `attn+kl_head_mean` · ours vs sdpa_flash |
| `no_maps_vs_sdpa` | no-map forward, D = 64, N ≥ 256: ≥ 1.0× the fastest SDPA backend (cuDNN included) | `synergistic_attention` · `no_maps` · fwd · ours vs min over `sdpa_*` but math |
| `loss_vs_eager` | attention + per-head loss, fwd+bwd, MUSE shapes: ≥ 4× faster than eager | `topology_kl_loss` · `attn+kl_per_head` · ours vs eager |
| `host_time` | host time of an eager forward call (wall − kernel time): ≤ 40 µs | `profile_kernels` rows · fwd · ours and cuda |
| `cuda_vs_triton` | CUDA C++ backend: ≤ 1.3× Triton's time in every case both measured | every case · cuda vs ours |
| `memory_vs_eager` | attention + per-head loss, fwd+bwd, MUSE shapes: peak memory ≤ 0.5× eager | as `loss_vs_eager` |
| `memory_vs_flash` | fused loss, fwd+bwd: peak memory ≤ 1.1× SDPA flash's | `attn+kl_*` · ours vs sdpa_flash |

``python -m benchmarks.targets DIR`` reads a run folder holding ``benchmarks.run``'s ``results.json``
and/or ``benchmarks.profile_kernels``' ``profile.json`` (and ``source.json`` from
``scripts/gpu_session.sh``), prints the table with its provenance (``--markdown``: the README's
table), the backend comparison behind ``auto`` (``--auto-rule``), or writes ``targets.md`` and
``targets.json`` there (``--write``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

from benchmarks.common import Result, _shape_label

MUSE_NS = (64, 256)
MAP_VARIANTS = ("per_head_fp32", "per_head_bf16", "head_mean_fp32")


@dataclass(frozen=True)
class Row:
    key: str
    target: str
    goal: str
    unit: str  # how a measured value reads: "%" (a fraction), "×" (a ratio) or "µs"
    at_least: bool  # the goal is a lower bound (else an upper bound)
    issue: bool = True  # one of issue 19's rows (the memory rows are the product's older targets, kept)


ROWS = (
    Row("bandwidth", "map-writing forward, N ≥ 256, % of measured copy bandwidth", "≥ 75 %", "%", True),
    Row("loss_per_head_vs_flash", "fused per-head topology loss fwd+bwd vs SDPA flash fwd+bwd, N=256", "≤ 1.25×",
        "×", False),
    Row("loss_head_mean_vs_flash", "fused head-mean loss fwd+bwd vs SDPA flash, N=64 / 256", "≤ 1.4×", "×", False),
    Row("no_maps_vs_sdpa", "no-map forward vs fastest SDPA (cuDNN), D=64, N ≥ 256", "≥ 1.0×", "×", True),
    Row("loss_vs_eager", "attention + per-head loss fwd+bwd vs eager, N=64 / 256", "≥ 4×", "×", True),
    Row("host_time", "host time of an eager forward call (wall − kernel)", "≤ 40 µs", "µs", False),
    Row("cuda_vs_triton", "CUDA C++ backend vs Triton, every case", "≤ 1.3× (or faster)", "×", False),
    Row("memory_vs_eager", "attention + per-head loss fwd+bwd, peak memory vs eager", "≤ 0.5×", "×", False,
        issue=False),
    Row("memory_vs_flash", "fused loss fwd+bwd, peak memory vs SDPA flash", "≤ 1.1×", "×", False, issue=False),
)
ROW_BY_KEY = {row.key: row for row in ROWS}


@dataclass
class Check:
    target: str
    case: str
    measured: float | None  # the ratio, fraction or time the bound applies to
    bound: str
    met: bool | None  # None: not measured in this run
    detail: str = ""
    row: str = ""  # the ROWS key this check belongs to


def _index(results: list[Result]) -> dict[tuple, Result]:
    return {(r.op, r.variant, r.mode, _shape_label(r.shape), r.provider): r for r in results if r.status == "ok"}


def _case(op: str, variant: str, mode: str, shape: dict) -> str:
    return f"{op} · {variant} · {mode} · {_shape_label(shape)}"


def _is_muse(shape: dict) -> bool:
    return shape.get("B") == 32 and shape.get("H") == 8 and shape.get("D") == 64


def _ratio_check(row, target, case, numerator, denominator, bound, limit, at_least, detail):
    if numerator is None or denominator is None or denominator == 0:
        return Check(target, case, None, bound, None, "not measured in this run", row)
    value = numerator / denominator
    return Check(target, case, value, bound, value >= limit if at_least else value <= limit, detail, row)


def _not_measured(row: str, target: str, bound: str, case: str) -> Check:
    return Check(target, case, None, bound, None, "not measured in this run", row)


def check_targets(results: list[Result], profile_rows: list[dict] | None = None) -> list[Check]:
    """Every row's checks on one run's results; ``profile_rows`` are ``profile_kernels``' rows (the
    host-time row), None when the run has none (that row is then not measured)."""
    ok = _index(results)
    shapes: dict[tuple, dict] = {}
    for r in results:
        shapes.setdefault((r.op, r.variant, r.mode), {})[_shape_label(r.shape)] = r.shape

    def get(op, variant, mode, label, provider):
        return ok.get((op, variant, mode, label, provider))

    checks = []
    # Attention + per-head maps + topology loss against the official eager way.
    op, variant, mode = "topology_kl_loss", "attn+kl_per_head", "fwd+bwd"
    for label, shape in shapes.get((op, variant, mode), {}).items():
        if shape.get("N") not in MUSE_NS or shape.get("B") != 32:
            continue
        eager, ours = get(op, variant, mode, label, "eager"), get(op, variant, mode, label, "ours")
        case = _case(op, variant, mode, shape)
        checks.append(_ratio_check("loss_vs_eager", "≥ 4× faster than eager", case, eager and eager.ms_median,
                                   ours and ours.ms_median, "eager ms / ours ms ≥ 4", 4.0, True,
                                   "speed-up over the official eager path"))
        checks.append(_ratio_check("memory_vs_eager", "peak memory ≤ 0.5× eager", case,
                                   ours and ours.peak_mem_mb, eager and eager.peak_mem_mb,
                                   "ours MB / eager MB ≤ 0.5", 0.5, False, "memory relative to the official eager path"))
    # Map-writing forward against the copy bandwidth.
    op = "synergistic_attention"
    for variant in MAP_VARIANTS:
        for label, shape in shapes.get((op, variant, "fwd"), {}).items():
            if shape.get("N", 0) < 256:
                continue
            ours = get(op, variant, "fwd", label, "ours")
            fraction = None if ours is None else ours.bandwidth_fraction
            case = _case(op, variant, "fwd", shape)
            if fraction is None:
                checks.append(_not_measured("bandwidth", "≥ 75 % of copy bandwidth", "GB/s / copy GB/s ≥ 0.75", case))
            else:
                checks.append(Check("≥ 75 % of copy bandwidth", case, fraction, "GB/s / copy GB/s ≥ 0.75",
                                    fraction >= 0.75, f"{ours.gbps:.0f} GB/s", "bandwidth"))
    # No maps, forward: against the fastest SDPA backend (math is no fast backend).
    for label, shape in shapes.get((op, "no_maps", "fwd"), {}).items():
        if shape.get("D") != 64 or shape.get("N", 0) < 256:
            continue
        sdpa = [r for key, r in ok.items() if key[:4] == (op, "no_maps", "fwd", label) and
                key[4].startswith("sdpa_") and key[4] != "sdpa_math"]
        fastest = min(sdpa, key=lambda r: r.ms_median) if sdpa else None
        ours = get(op, "no_maps", "fwd", label, "ours")
        checks.append(_ratio_check("no_maps_vs_sdpa", "≥ 1.0× the fastest SDPA", _case(op, "no_maps", "fwd", shape),
                                   fastest and fastest.ms_median, ours and ours.ms_median,
                                   "fastest SDPA ms / ours ms ≥ 1.0", 1.0, True,
                                   f"fastest: {fastest.provider}" if fastest else ""))
    # The fused loss against SDPA flash alone (attention without maps or loss).
    op, mode = "topology_kl_loss", "fwd+bwd"
    for variant, row, limit, ns in (("attn+kl_per_head", "loss_per_head_vs_flash", 1.25, (256,)),
                                    ("attn+kl_head_mean", "loss_head_mean_vs_flash", 1.4, MUSE_NS)):
        for label, shape in shapes.get((op, variant, mode), {}).items():
            flash, ours = get(op, variant, mode, label, "sdpa_flash"), get(op, variant, mode, label, "ours")
            case = _case(op, variant, mode, shape)
            if _is_muse(shape) and shape.get("N") in ns:
                checks.append(_ratio_check(row, f"≤ {limit:g}× SDPA flash time", case, ours and ours.ms_median,
                                           flash and flash.ms_median, f"ours ms / flash ms ≤ {limit:g}", limit,
                                           False, ""))
            checks.append(_ratio_check("memory_vs_flash", "≤ 1.1× SDPA flash memory", case,
                                       ours and ours.peak_mem_mb, flash and flash.peak_mem_mb,
                                       "ours MB / flash MB ≤ 1.1", 1.1, False, ""))
    checks += cuda_vs_triton_checks(results)
    checks += host_time_checks(profile_rows)
    return checks


def cuda_vs_triton_checks(results: list[Result]) -> list[Check]:
    """The CUDA C++ backend against Triton in every case where both were measured."""
    ok = _index(results)
    checks = []
    for (op, variant, mode, label, provider), cuda in ok.items():
        ours = ok.get((op, variant, mode, label, "ours"))
        if provider != "cuda" or ours is None:
            continue
        checks.append(_ratio_check("cuda_vs_triton", "CUDA C++ ≤ 1.3× Triton", _case(op, variant, mode, cuda.shape),
                                   cuda.ms_median, ours.ms_median, "cuda ms / ours ms ≤ 1.3", 1.3, False,
                                   f"cuda {cuda.ms_median:.3f} ms, triton {ours.ms_median:.3f} ms"))
    if not checks:
        checks.append(_not_measured("cuda_vs_triton", "CUDA C++ ≤ 1.3× Triton", "cuda ms / ours ms ≤ 1.3",
                                    "no case with both cuda and ours measured"))
    return checks


HOST_PROVIDERS = ("ours", "cuda")
HOST_LIMIT_US = 40.0


def host_time_checks(profile_rows: list[dict] | None) -> list[Check]:
    """Host time of an eager forward call, wall − kernel time per call from ``profile_kernels``: what
    the host adds that the device does not hide. SDPA flash's, where profiled, is the detail's floor."""
    target, bound = "host time ≤ 40 µs per eager forward call", "wall − kernel µs ≤ 40"
    rows = [r for r in profile_rows or () if r.get("mode") == "fwd"]
    by_case = {(r["op"], r["variant"], _shape_label(r["shape"]), r["provider"]): r for r in rows}
    checks = []
    for r in rows:
        if r["provider"] not in HOST_PROVIDERS:
            continue
        host_us = (r["wall_ms"] - r["kernel_ms"]) * 1e3
        detail = f"{r['provider']}: wall {r['wall_ms'] * 1e3:.0f} µs, kernels {r['kernel_ms'] * 1e3:.0f} µs"
        flash = by_case.get((r["op"], r["variant"], _shape_label(r["shape"]), "sdpa_flash"))
        if flash is not None:
            detail += f"; sdpa_flash {(flash['wall_ms'] - flash['kernel_ms']) * 1e3:.0f} µs"
        checks.append(Check(target, _case(r["op"], r["variant"], "fwd", r["shape"]) + f" · {r['provider']}",
                            host_us, bound, host_us <= HOST_LIMIT_US, detail, "host_time"))
    if not checks:
        checks.append(_not_measured("host_time", target, bound, "no profile_kernels forward row of ours or cuda"))
    return checks


@dataclass
class RowSummary:
    key: str
    target: str
    goal: str
    status: str  # met, missed, not measured, partly measured
    measured: str  # the range over the row's measured cases, in the row's unit
    worst_case: str
    cases: int
    measured_cases: int


def _format(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.0f} %"
    if unit == "µs":
        return f"{value:.0f} µs"
    return f"{value:.2f}×"


def summarize(checks: list[Check]) -> list[RowSummary]:
    """One line per row: met only when every case of the row was measured and met."""
    summaries = []
    for row in ROWS:
        mine = [c for c in checks if c.row == row.key]
        measured = [c for c in mine if c.met is not None]
        if not measured:
            status, span, worst = "not measured", "", ""
        else:
            values = sorted(c.measured for c in measured)
            low, high = _format(values[0], row.unit), _format(values[-1], row.unit)
            span = low if low == high else f"{low} – {high}"
            worst_check = (min if row.at_least else max)(measured, key=lambda c: c.measured)
            worst = worst_check.case
            if any(c.met is False for c in measured):
                status = "missed"
            elif len(measured) < len(mine):
                status = "partly measured"
            else:
                status = "met"
        summaries.append(RowSummary(row.key, row.target, row.goal, status, span, worst, len(mine), len(measured)))
    return summaries


def targets_markdown(checks: list[Check]) -> str:
    lines = ["| target | case | measured | bound | status |", "|---|---|---|---|---|"]
    for c in checks:
        status = "not measured" if c.met is None else ("met" if c.met else "**missed**")
        measured = "" if c.measured is None else f"{c.measured:.3g}"
        detail = f" ({c.detail})" if c.detail and c.met is not None else ""
        lines.append(f"| {c.target} | {c.case} | {measured}{detail} | {c.bound} | {status} |")
    return "\n".join(lines) + "\n"


def checks_as_rows(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


# ---------------------------------------------------------------- the backend comparison behind `auto`

@dataclass
class BackendComparison:
    op: str
    variant: str
    mode: str
    shape: str
    basis: str  # "device" (CUDA graph replays), "wall" (eager calls, benchmarks.run) or "eager call" (profile)
    triton_ms: float
    cuda_ms: float
    faster: str  # "triton" or "cuda"


def compare_backends(results: list[Result], timing_basis: str,
                     profile_rows: list[dict] | None = None) -> list[BackendComparison]:
    """Per (op, variant, mode, shape): Triton (`ours`) against the CUDA C++ backend (`cuda`), on the
    run's own timing basis and, where profiled, on the wall time of eager calls too."""
    rows = []
    ok = _index(results)
    for (op, variant, mode, label, provider), cuda in ok.items():
        ours = ok.get((op, variant, mode, label, "ours"))
        if provider == "cuda" and ours is not None:
            rows.append(BackendComparison(op, variant, mode, label, timing_basis, ours.ms_median, cuda.ms_median,
                                          "cuda" if cuda.ms_median < ours.ms_median else "triton"))
    profiled = {(r["op"], r["variant"], r["mode"], _shape_label(r["shape"]), r["provider"]): r
                for r in profile_rows or ()}
    for (op, variant, mode, label, provider), cuda in profiled.items():
        ours = profiled.get((op, variant, mode, label, "ours"))
        if provider == "cuda" and ours is not None:
            rows.append(BackendComparison(op, variant, mode, label, "eager call", ours["wall_ms"], cuda["wall_ms"],
                                          "cuda" if cuda["wall_ms"] < ours["wall_ms"] else "triton"))
    return rows


def auto_rule_markdown(rows: list[BackendComparison]) -> str:
    if not rows:
        return "No case has both the Triton (`ours`) and the CUDA C++ (`cuda`) backend measured.\n"
    lines = []
    for basis in dict.fromkeys(r.basis for r in rows):
        mine = [r for r in rows if r.basis == basis]
        wins = [r for r in mine if r.faster == "cuda"]
        lines.append(f"- {basis} time: CUDA C++ faster in {len(wins)} of {len(mine)} cases"
                     + (": " + "; ".join(f"{r.op} · {r.variant} · {r.mode} · {r.shape}" for r in wins) if wins else ""))
    lines += ["", "| op | variant | mode | shape | timing | triton ms | cuda ms | cuda / triton | faster |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.variant} | {r.mode} | {r.shape} | {r.basis} | {r.triton_ms:.4f} | "
                     f"{r.cuda_ms:.4f} | {r.cuda_ms / r.triton_ms:.2f} | {r.faster} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- one run folder

@dataclass
class RunFolder:
    path: str
    results: list[Result] = field(default_factory=list)
    results_provenance: dict | None = None
    profile_rows: list[dict] | None = None
    profile_provenance: dict | None = None
    source: dict | None = None  # written by scripts/gpu_session.sh: the commit the tree was sent from

    @property
    def timing_basis(self) -> str:
        return "device" if (self.results_provenance or {}).get("cuda_graphs") else "wall"


def load_run_folder(path: str) -> RunFolder:
    """A folder with ``benchmarks.run``'s results.json and/or ``profile_kernels``' profile.json."""
    folder = RunFolder(path)
    results_path, profile_path = os.path.join(path, "results.json"), os.path.join(path, "profile.json")
    if not os.path.exists(results_path) and not os.path.exists(profile_path):
        raise FileNotFoundError(f"run folder {path!r} holds neither results.json (benchmarks.run) nor "
                                "profile.json (benchmarks.profile_kernels)")
    if os.path.exists(results_path):
        with open(results_path) as f:
            saved = json.load(f)
        folder.results = [Result(**row) for row in saved["results"]]
        folder.results_provenance = saved["provenance"]
    if os.path.exists(profile_path):
        with open(profile_path) as f:
            saved = json.load(f)
        folder.profile_rows, folder.profile_provenance = saved["rows"], saved["provenance"]
    source_path = os.path.join(path, "source.json")
    if os.path.exists(source_path):
        with open(source_path) as f:
            folder.source = json.load(f)
    return folder


def folder_checks(folder: RunFolder) -> list[Check]:
    return check_targets(folder.results, folder.profile_rows)


def provenance_markdown(folder: RunFolder) -> str:
    lines = []
    for name, info in (("benchmarks.run", folder.results_provenance),
                       ("profile_kernels", folder.profile_provenance)):
        if info is None:
            continue
        timing = ""
        if name == "benchmarks.run":
            timing = ", CUDA graph replays (device time)" if info.get("cuda_graphs") else ", wall time of eager calls"
            if info.get("copy_gbps"):
                timing += f", measured copy bandwidth {info['copy_gbps']:.0f} GB/s"
            if info.get("interrupted_after"):
                timing += f", interrupted after {info['interrupted_after']}"
        lines.append(f"- {name}: {info.get('gpu') or info.get('cpu')}, driver {info.get('driver')}, "
                     f"torch {info.get('torch')}, triton {info.get('triton')}, git {info.get('git_sha')}, "
                     f"{info.get('date')}{timing}; `{info.get('command')}`")
    if folder.source:
        lines.append(f"- source: commit {folder.source.get('source_commit')} (the device's own git metadata: "
                     f"{folder.source.get('device_head')}), tree sha256 {folder.source.get('tree_sha256')}")
    return "\n".join(lines) + "\n"


def table_markdown(summaries: list[RowSummary]) -> str:
    lines = ["| target | goal | measured | status | worst case |", "|---|---|---|---|---|"]
    for s in summaries:
        kept = "" if ROW_BY_KEY[s.key].issue else " (kept)"
        status = {"missed": "**missed**"}.get(s.status, s.status)
        count = f" ({s.measured_cases} of {s.cases} cases)" if s.status == "partly measured" else ""
        lines.append(f"| {s.target}{kept} | {s.goal} | {s.measured} | {status}{count} | {s.worst_case} |")
    return "\n".join(lines) + "\n"


def readme_markdown(folder: RunFolder) -> str:
    """The README's table: provenance lines, then one line per row."""
    return provenance_markdown(folder) + "\n" + table_markdown(summarize(folder_checks(folder)))


def report_markdown(folder: RunFolder) -> str:
    checks = folder_checks(folder)
    comparisons = compare_backends(folder.results, folder.timing_basis, folder.profile_rows)
    return (f"# Targets: {folder.path}\n\n{provenance_markdown(folder)}\n{table_markdown(summarize(checks))}\n"
            f"## Every case\n\n{targets_markdown(checks)}\n"
            f"## Triton vs CUDA C++ per case (the `auto` rule's evidence)\n\n{auto_rule_markdown(comparisons)}")


def write_report(folder: RunFolder) -> dict[str, str]:
    checks = folder_checks(folder)
    comparisons = compare_backends(folder.results, folder.timing_basis, folder.profile_rows)
    paths = {"markdown": os.path.join(folder.path, "targets.md"), "json": os.path.join(folder.path, "targets.json")}
    with open(paths["markdown"], "w") as f:
        f.write(report_markdown(folder))
    with open(paths["json"], "w") as f:
        json.dump({"provenance": {"run": folder.results_provenance, "profile": folder.profile_provenance,
                                  "source": folder.source},
                   "rows": [asdict(s) for s in summarize(checks)], "checks": checks_as_rows(checks),
                   "auto_rule": [asdict(c) for c in comparisons]}, f, indent=1)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Issue 19's targets on one run folder (results.json, profile.json)")
    parser.add_argument("folder", help="a folder written by benchmarks.run and/or benchmarks.profile_kernels")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--markdown", action="store_true", help="print the README's table with its provenance")
    what.add_argument("--auto-rule", action="store_true", help="print Triton vs CUDA C++ per case")
    what.add_argument("--write", action="store_true", help="write targets.md and targets.json into the folder")
    args = parser.parse_args(argv)
    try:
        folder = load_run_folder(args.folder)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.markdown:
        print(readme_markdown(folder), end="")
    elif args.auto_rule:
        print(auto_rule_markdown(compare_backends(folder.results, folder.timing_basis, folder.profile_rows)), end="")
    elif args.write:
        paths = write_report(folder)
        print(table_markdown(summarize(folder_checks(folder))), end="")
        print("wrote " + ", ".join(sorted(paths.values())))
    else:
        print(report_markdown(folder), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
