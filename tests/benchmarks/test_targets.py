"""Target checks on hand-made results: met, missed and not-measured are told apart."""

from benchmarks.common import Result
from benchmarks.targets import check_targets, targets_markdown

MUSE = dict(B=32, H=8, N=256, D=64)


def _row(op, variant, mode, provider, ms, mb=None, shape=MUSE, fraction=None, status="ok"):
    return Result(op, provider, variant, mode, dict(shape), "bfloat16", status=status, ms_median=ms, ms_p20=ms,
                  ms_p80=ms, peak_mem_mb=mb, bandwidth_fraction=fraction, gbps=None if fraction is None else 2000.0)


def _by(checks, target):
    return [c for c in checks if c.target == target]


def test_speedup_and_memory_against_eager():
    checks = check_targets([_row("topology_kl_loss", "attn+kl_per_head", "fwd+bwd", "eager", 10.0, 800.0),
                            _row("topology_kl_loss", "attn+kl_per_head", "fwd+bwd", "ours", 2.0, 500.0)])
    (speed,) = _by(checks, "≥ 4× faster than eager")
    (memory,) = _by(checks, "peak memory ≤ 0.5× eager")
    assert speed.measured == 5.0 and speed.met is True
    assert memory.measured == 0.625 and memory.met is False
    assert "**missed**" in targets_markdown(checks) and "| met |" in targets_markdown(checks)


def test_bandwidth_and_sdpa_targets():
    rows = [_row("synergistic_attention", "per_head_fp32", "fwd", "ours", 1.0, fraction=0.72),
            _row("synergistic_attention", "per_head_bf16", "fwd", "ours", 1.0, fraction=0.5),
            _row("synergistic_attention", "per_head_fp32", "fwd", "ours", 1.0, fraction=0.1,
                 shape=dict(MUSE, N=64)),  # below N = 256: not a target case
            _row("synergistic_attention", "no_maps", "fwd", "sdpa_flash", 1.0),
            _row("synergistic_attention", "no_maps", "fwd", "sdpa_cudnn", 0.8),
            _row("synergistic_attention", "no_maps", "fwd", "sdpa_math", 0.1),  # not a fast backend
            _row("synergistic_attention", "no_maps", "fwd", "ours", 0.85)]
    checks = check_targets(rows)
    bandwidth = {c.case.split(" · ")[1]: c for c in _by(checks, "≥ 70 % of copy bandwidth")}
    assert set(bandwidth) == {"per_head_fp32", "per_head_bf16"}
    assert bandwidth["per_head_fp32"].met is True and bandwidth["per_head_bf16"].met is False
    (sdpa,) = _by(checks, "≥ 0.9× the fastest SDPA")
    assert abs(sdpa.measured - 0.8 / 0.85) < 1e-12 and sdpa.met is True and "sdpa_cudnn" in sdpa.detail


def test_unmeasured_cases_are_never_met():
    rows = [_row("topology_kl_loss", "attn+kl_head_mean", "fwd+bwd", "ours", 1.0, 100.0),
            _row("topology_kl_loss", "attn+kl_head_mean", "fwd+bwd", "sdpa_flash", None, status="skipped")]
    checks = check_targets(rows)
    assert checks and all(c.met is None and c.measured is None for c in checks)
    assert "not measured" in targets_markdown(checks)
