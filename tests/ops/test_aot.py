"""Every kernel configuration compiles for sm_80 and sm_90, fits in shared memory and stays within
its spill budget.

The interpreter runs the kernels as Python and forgives what the GPU compiler does not, so the
compiler runs here too, in a subprocess without TRITON_INTERPRET. The default suite compiles
``representative_specs`` (every launch group, pointer dtype and input dtype at least once per arch);
MUSE_AOT_FULL=1 compiles every variant.
"""

import json
import os
import subprocess
import sys

import pytest

FULL = os.environ.get("MUSE_AOT_FULL", "0") == "1"


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subset = [] if FULL else ["--representative"]
    # A cold Triton cache (after a kernel source change) took 43 min on the 2-core CI machine; warm, ~3 min.
    proc = subprocess.run([sys.executable, "-m", "muse_kernels.aot", "--json", str(out), *subset],
                          env=env, capture_output=True, text=True, timeout=4800)
    assert out.exists(), f"AOT compile crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def _compiled_specs():
    from muse_kernels.aot import kernel_specs, representative_specs

    specs = kernel_specs()
    return specs if FULL else representative_specs(specs)


def test_every_configuration_compiles_for_sm80_and_sm90(aot_results):
    proc, results = aot_results
    specs = {s.label() for s in _compiled_specs()}
    for arch in (80, 90):
        compiled = {r["spec"] for r in results if r["arch"] == arch}
        assert compiled == specs, f"sm_{arch}: missing {sorted(specs - compiled)[:3]}"
    # Every kernel of the op is among them.
    kernels = {label.split("[")[0] for label in specs}
    assert kernels == {"_synergistic_attention_fwd_kernel", "_synergistic_attention_maps_kernel",
                       "_synergistic_attention_single_pass_kernel",
                       "_synergistic_attention_bwd_dq_kernel", "_synergistic_attention_bwd_dkdv_kernel"}


def test_representative_subset_keeps_every_launch_group_and_dtype():
    """What the default suite leaves out differs from a compiled variant only in one argument's dtype,
    and that dtype is compiled for that argument of that kernel elsewhere."""
    from muse_kernels.aot import kernel_specs, representative_specs

    specs = kernel_specs()
    subset = representative_specs(specs)
    assert len(subset) < 0.5 * len(specs)
    assert {s.launch_group() for s in subset} == {s.launch_group() for s in specs}
    pointer_dtypes = lambda group: {(s.kernel, *p) for s in group for p in s.pointer_dtypes}  # noqa: E731
    assert pointer_dtypes(subset) == pointer_dtypes(specs)
    inputs = lambda group: {(s.kernel, dict(s.pointer_dtypes)["Q"], s.aligned) for s in group}  # noqa: E731
    assert inputs(subset) == inputs(specs)


def test_shared_memory_fits_the_device_limit(aot_results):
    proc, results = aot_results
    over = [r for r in results if r["shared_bytes"] > r["limit_bytes"]]
    assert not over, f"over the shared-memory limit: {over[:3]}"
    assert all(r["shared_bytes"] > 0 for r in results if "fwd" in r["spec"])


def test_registers_and_spills_are_reported_and_within_budget(aot_results):
    from muse_kernels.aot import SPILL_BUDGET_BYTES

    proc, results = aot_results
    assert all(0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 for r in results)
    # The measurement sees real spills: the FMA (ieee) dots of fp32 without TF32 do spill.
    assert any(r["spill_bytes"] > 0 for r in results if "INPUT_PRECISION=ieee" in r["spec"])
    budgeted = [r for r in results if r["spill_budget_bytes"] is not None]
    assert {r["spill_budget_bytes"] for r in budgeted if "single_pass" in r["spec"]} == {0}
    assert {r["spill_budget_bytes"] for r in budgeted if "single_pass" not in r["spec"]} == {SPILL_BUDGET_BYTES}
    assert all(r["spec"].endswith("|aligned]") and "ieee" not in r["spec"] for r in budgeted)
    over = [(r["arch"], r["spill_bytes"], r["spec"]) for r in results if not r["within_budget"]]
    assert not over, f"{len(over)} variants over their spill budget, e.g. {over[:3]}"
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_muse_specializations_compile_the_general_path_out(aot_results):
    """GENERAL=False (MUSE: self-attention, no mask) never loads the general path's arguments, so the
    masks, causal, GQA and N_q != N_k features cost it nothing; the general kernels do read them."""
    _, results = aot_results
    muse = [r for r in results if "GENERAL=False" in r["spec"]]
    general = [r for r in results if "GENERAL=True" in r["spec"]]
    assert muse and general
    assert all(r["general_args_read"] == [] for r in muse), [r["spec"] for r in muse if r["general_args_read"]][:3]
    assert all("N_K" in r["general_args_read"] for r in general)
    assert all("Mask" in r["general_args_read"] for r in general if "MASK=none" not in r["spec"])
