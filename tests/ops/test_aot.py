"""Every kernel configuration compiles for sm_80 and sm_90 and fits in shared memory.

The interpreter runs the kernels as Python and forgives what the GPU compiler does not, so the
compiler runs here too, in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "muse_kernels.aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=3000)
    assert out.exists(), f"AOT compile crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_every_configuration_compiles_for_sm80_and_sm90(aot_results):
    from muse_kernels.aot import kernel_specs

    proc, results = aot_results
    specs = {s.label() for s in kernel_specs()}
    for arch in (80, 90):
        compiled = {r["spec"] for r in results if r["arch"] == arch}
        assert compiled == specs, f"sm_{arch}: missing {sorted(specs - compiled)[:3]}"
    # Every kernel of the op is among them.
    kernels = {label.split("[")[0] for label in specs}
    assert kernels == {"_synergistic_attention_fwd_kernel", "_synergistic_attention_maps_kernel",
                       "_synergistic_attention_bwd_dq_kernel", "_synergistic_attention_bwd_dkdv_kernel"}


def test_shared_memory_fits_the_device_limit(aot_results):
    proc, results = aot_results
    over = [r for r in results if r["shared_bytes"] > r["limit_bytes"]]
    assert not over, f"over the shared-memory limit: {over[:3]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(r["shared_bytes"] > 0 for r in results if "fwd" in r["spec"])


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
