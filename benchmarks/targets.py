"""The product's speed and memory targets, checked against one benchmark run's results.

Every check compares providers measured in the same run on the same shape. A check whose cases were
not measured (skipped provider, CPU run, other shapes) is reported as such, never as met.

| target | cases |
|---|---|
| attention + per-head maps + topology loss, fwd+bwd, MUSE shapes: ≥ 4× faster than eager, peak memory ≤ 0.5× | `topology_kl_loss` · `attn+kl_per_head` · fwd+bwd · ours vs eager |
| map-writing forward at N ≥ 256: ≥ 70 % of the measured copy bandwidth | `synergistic_attention` · map variants · fwd · ours |
| without maps, D = 64, N ≥ 256: ≥ 0.9× the fastest SDPA backend's throughput | `synergistic_attention` · `no_maps` · every mode · ours vs min over `sdpa_*` |
| fused topology loss, fwd+bwd: ≤ 1.25× SDPA flash's time, ≤ 1.1× its memory | `topology_kl_loss` · `attn+kl_*` · fwd+bwd · ours vs sdpa_flash |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from benchmarks.common import Result, _shape_label

MUSE_NS = (64, 256)


@dataclass
class Check:
    target: str
    case: str
    measured: float | None  # the ratio or fraction the bound applies to
    bound: str
    met: bool | None  # None: not measured in this run
    detail: str = ""


def _index(results: list[Result]) -> dict[tuple, Result]:
    return {(r.op, r.variant, r.mode, _shape_label(r.shape), r.provider): r for r in results if r.status == "ok"}


def _case(op: str, variant: str, mode: str, shape: dict) -> str:
    return f"{op} · {variant} · {mode} · {_shape_label(shape)}"


def _ratio_check(target, case, numerator, denominator, bound, limit, at_least, detail):
    if numerator is None or denominator is None or denominator == 0:
        return Check(target, case, None, bound, None, "not measured in this run")
    value = numerator / denominator
    return Check(target, case, value, bound, value >= limit if at_least else value <= limit, detail)


def check_targets(results: list[Result]) -> list[Check]:
    ok = _index(results)
    shapes = {}
    for r in results:
        shapes.setdefault((r.op, r.variant, r.mode), {})[_shape_label(r.shape)] = r.shape

    def get(op, variant, mode, label, provider):
        return ok.get((op, variant, mode, label, provider))

    checks = []
    # 1. Attention + per-head maps + topology loss against the official eager way.
    op, variant, mode = "topology_kl_loss", "attn+kl_per_head", "fwd+bwd"
    for label, shape in shapes.get((op, variant, mode), {}).items():
        if shape.get("N") not in MUSE_NS or shape.get("B") != 32:
            continue
        eager, ours = get(op, variant, mode, label, "eager"), get(op, variant, mode, label, "ours")
        case = _case(op, variant, mode, shape)
        checks.append(_ratio_check("≥ 4× faster than eager", case, eager and eager.ms_median,
                                   ours and ours.ms_median, "eager ms / ours ms ≥ 4", 4.0, True,
                                   "speed-up over the official eager path"))
        checks.append(_ratio_check("peak memory ≤ 0.5× eager", case, ours and ours.peak_mem_mb,
                                   eager and eager.peak_mem_mb, "ours MB / eager MB ≤ 0.5", 0.5, False,
                                   "memory relative to the official eager path"))
    # 2. Map-writing forward against the copy bandwidth.
    op = "synergistic_attention"
    for variant in ("per_head_fp32", "per_head_bf16", "head_mean_fp32"):
        for label, shape in shapes.get((op, variant, "fwd"), {}).items():
            if shape.get("N", 0) < 256:
                continue
            ours = get(op, variant, "fwd", label, "ours")
            fraction = None if ours is None else ours.bandwidth_fraction
            case = _case(op, variant, "fwd", shape)
            if fraction is None:
                checks.append(Check("≥ 70 % of copy bandwidth", case, None, "GB/s / copy GB/s ≥ 0.7", None,
                                    "not measured in this run"))
            else:
                checks.append(Check("≥ 70 % of copy bandwidth", case, fraction, "GB/s / copy GB/s ≥ 0.7",
                                    fraction >= 0.7, f"{ours.gbps:.0f} GB/s"))
    # 3. No maps: against the fastest SDPA backend.
    for mode in ("fwd", "bwd", "fwd+bwd"):
        for label, shape in shapes.get((op, "no_maps", mode), {}).items():
            if shape.get("D") != 64 or shape.get("N", 0) < 256:
                continue
            sdpa = [r for key, r in ok.items() if key[:4] == (op, "no_maps", mode, label) and
                    key[4].startswith("sdpa_") and key[4] != "sdpa_math"]
            fastest = min(sdpa, key=lambda r: r.ms_median) if sdpa else None
            ours = get(op, "no_maps", mode, label, "ours")
            checks.append(_ratio_check("≥ 0.9× the fastest SDPA", _case(op, "no_maps", mode, shape),
                                       fastest and fastest.ms_median, ours and ours.ms_median,
                                       "fastest SDPA ms / ours ms ≥ 0.9", 0.9, True,
                                       f"fastest: {fastest.provider}" if fastest else ""))
    # 4. The fused loss against SDPA flash alone (attention without maps or loss).
    op, mode = "topology_kl_loss", "fwd+bwd"
    for variant in ("attn+kl_per_head", "attn+kl_head_mean"):
        for label, shape in shapes.get((op, variant, mode), {}).items():
            flash, ours = get(op, variant, mode, label, "sdpa_flash"), get(op, variant, mode, label, "ours")
            case = _case(op, variant, mode, shape)
            checks.append(_ratio_check("≤ 1.25× SDPA flash time", case, ours and ours.ms_median,
                                       flash and flash.ms_median, "ours ms / flash ms ≤ 1.25", 1.25, False, ""))
            checks.append(_ratio_check("≤ 1.1× SDPA flash memory", case, ours and ours.peak_mem_mb,
                                       flash and flash.peak_mem_mb, "ours MB / flash MB ≤ 1.1", 1.1, False, ""))
    return checks


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
