"""benchmarks.host_overhead: every case runs with the kernels stubbed, launches what it should, and
the real kernels are back afterwards."""

import pytest

from benchmarks import host_overhead
from muse_kernels.ops import synergistic_attention as op


def test_measure_times_every_case_with_stubbed_kernels():
    kernels = {name: getattr(op, name) for name in host_overhead.KERNEL_NAMES}
    rows = host_overhead.measure(shape=(1, 2, 64, 64), calls=3, repeats=1)
    assert [r["case"] for r in rows] == list(host_overhead.cases((1, 2, 64, 64), op.torch.bfloat16))
    assert all(r["us_per_call"] > 0 for r in rows)
    launches = {r["case"]: r["launches"] for r in rows}
    assert launches.pop("floor: one autograd node + output allocation") == 0
    # MUSE shapes at N = 64: one kernel per forward (single pass with maps, flash forward without).
    assert set(launches.values()) == {1}
    assert {name: getattr(op, name) for name in host_overhead.KERNEL_NAMES} == kernels


def test_refuses_to_run_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        host_overhead.measure(calls=1, repeats=1)
