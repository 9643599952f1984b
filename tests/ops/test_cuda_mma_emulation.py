"""The CPU emulation of the register-level tensor-core primitives (csrc/mma_sm80.cuh: ldmatrix,
mma.sync m16n8k16, cp.async) that the fp16/bf16 CUDA forward is built on: per-lane PTX fragment
layouts, so that a fragment-layout bug in a kernel shows up as wrong numbers without a GPU."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from muse_kernels.ops.synergistic_attention_cuda import CSRC
from test_synergistic_attention_cuda_emulated import CUDA_INCLUDE, HARNESS

pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None or shutil.which("g++") is None,
                                reason="the emulation needs g++ and the CUDA headers (cuda_fp16.h)")

CHECKS = [f"{dtype} {check}" for dtype in ("f16", "bf16") for check in (
    "ldmatrix.x4 + ldmatrix.x2 + mma = A·B + C",
    "ldmatrix.x4.trans + ldmatrix.x2.trans + mma = A·B + C",
    "ldmatrix.x1 + ldmatrix.x1.trans + mma = A·B + C",
    "fragments from the PTX formulas + mma = A·B + C",
    "swapped row halves give the row-swapped product",
    "8x8 blocks in column order give a wrong product",
)] + ["cp.async copies 16 bytes, zero-fills without a source"]


@pytest.fixture(scope="module")
def mma_check(tmp_path_factory):
    binary = tmp_path_factory.mktemp("mma") / "mma_check"
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-DMUSE_CPU_EMULATION",
           "-include", str(HARNESS / "cpu_shim.h"), "-I", str(CSRC), "-I", str(CUDA_INCLUDE),
           str(HARNESS / "mma_check.cpp"), "-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    return binary


def test_emulated_ldmatrix_and_mma_follow_the_ptx_fragment_layouts(mma_check):
    run = subprocess.run([str(mma_check)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [f"ok {check}" for check in CHECKS]


def test_emulated_ldmatrix_rejects_a_misaligned_row(mma_check):
    run = subprocess.run([str(mma_check), "misaligned"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "emulated ldmatrix: address" in run.stderr and "16-byte aligned shared-memory row" in run.stderr
