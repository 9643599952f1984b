"""pytest-benchmark timings of the op-level paths on a GPU (speed targets live in the suite, not here)."""

import pytest
import torch

from benchmarks import bench_synergistic_attention as bsa
from benchmarks import bench_topology_kl_loss as btk

MUSE_SHAPE = dict(B=32, H=8, N=256, D=64)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ("ours", "cuda"))
@pytest.mark.parametrize("variant", list(bsa.VARIANTS))
@pytest.mark.parametrize("mode", bsa.MODES)
def test_attention(benchmark, provider, variant, mode):
    return_attn, attn_dtype = bsa.VARIANTS[variant]
    device = torch.device("cuda")
    step = bsa.timed_step(bsa.forward_fn(provider, return_attn, attn_dtype, device), mode, MUSE_SHAPE,
                          torch.bfloat16, device)

    def run():
        step()
        torch.cuda.synchronize()

    benchmark(run)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(btk.VARIANTS))
def test_topology_loss_ours(benchmark, variant):
    reduction, with_attention = btk.VARIANTS[variant]
    device = torch.device("cuda")
    step = btk.timed_step(btk.step_fn("ours", reduction, with_attention, device), "fwd+bwd", MUSE_SHAPE,
                          torch.bfloat16, device)

    def run():
        step()
        torch.cuda.synchronize()

    benchmark(run)
