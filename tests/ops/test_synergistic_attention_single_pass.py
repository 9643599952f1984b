"""The single-pass forward (fp16/bf16, N ≤ 256 at head dim 32/64, ≤ 128 at 16, maps requested): parity with the fp64 reference
(FlashAttention rule) for outputs, maps and every gradient through the unchanged backward, on the key
tiles' boundaries; the dispatch rule; one program per query tile for all heads of a head-mean map."""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv
from muse_kernels.ops import synergistic_attention as op
from test_synergistic_attention import check_parity

# fp32 inputs take the two-kernel path (test_synergistic_attention's grid covers them at these N).
DTYPES = (torch.bfloat16, torch.float16)
# N = 1, primes, and both sides of every key tile (64, 128, 256).
SEQS = (1, 2, 31, 63, 64, 65, 127, 128, 129, 251, 256)


def _shape(seq: int) -> tuple[int, int, int, int]:
    # Two batches at small N exercise the batch offsets; one at large N keeps the interpreter fast.
    return (2, 3, seq, 64) if seq <= 65 else (1, 2, seq, 64)


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("return_attn", ("per_head", "head_mean"))
def test_single_pass_parity(seq, dtype, return_attn, device):
    assert op.single_pass_key_tile(seq, 64, dtype) is not None
    check_parity(_shape(seq), dtype, device, return_attn=return_attn, shield=True)


@pytest.mark.parametrize("layout", ("bnhd", "sliced"))
# 129 lies in the 256-key tile at a quarter of the interpreter's cost of 256.
@pytest.mark.parametrize("seq,dim", [(65, 32), (129, 64), (17, 16)])
@pytest.mark.parametrize("return_attn", ("per_head", "head_mean"))
def test_single_pass_strided_unshielded_bf16_maps(layout, seq, dim, return_attn, device):
    """Strided inputs (views of a packed projection, rows of a wider buffer), ordinary gradients
    (dP = dO·Vᵀ + the maps' gradient) and maps stored in bf16."""
    assert op.single_pass_key_tile(seq, dim, torch.bfloat16) is not None
    check_parity((1, 2, seq, dim), torch.bfloat16, device, return_attn=return_attn, shield=False, layout=layout,
                 attn_dtype=torch.bfloat16)


@pytest.mark.parametrize("seq", (64, 200))
@pytest.mark.parametrize("return_attn", ("per_head", "head_mean"))
def test_single_pass_agrees_with_the_two_kernel_path(seq, return_attn, device, monkeypatch):
    """Same out, maps and LSE (which the backward kernels read) as the flash forward + maps kernel."""
    q, k, v = make_qkv((2, 3, seq, 32) if seq <= 64 else (1, 2, seq, 32), torch.float16, device, layout="bnhd")
    single = op.synergistic_attention_forward(q, k, v, 0.2, return_attn, torch.float32)
    monkeypatch.setattr(op, "single_pass_key_tile", lambda seq, head_dim, dtype: None)
    two_kernel = op.synergistic_attention_forward(q, k, v, 0.2, return_attn, torch.float32)
    # Same fp16 products accumulated in fp32; the output differs by fp16 rounding of P·V at most.
    for name, a, b, atol in zip(("out", "attn", "lse"), single[:3], two_kernel[:3], (2e-3, 1e-6, 1e-5)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


def test_key_tile_rule():
    bf16 = torch.bfloat16
    assert [op.single_pass_key_tile(n, 64, bf16) for n in (1, 64, 65, 128, 129, 256, 257, 1024)] == \
        [64, 64, 128, 128, 256, 256, None, None]
    assert op.single_pass_key_tile(100, 16, torch.float16) == op.single_pass_key_tile(100, 32, bf16) == 128
    assert op.single_pass_key_tile(64, 128, bf16) is None
    assert op.single_pass_key_tile(129, 16, bf16) is None
    assert op.single_pass_key_tile(64, 64, torch.float32) is None


class _Recorder:
    """Stands in for a kernel: records the grid and the block sizes, runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, grid, kwargs.get("BLOCK_M")))
        return launch


KERNELS = ("_synergistic_attention_single_pass_kernel", "_synergistic_attention_fwd_kernel",
           "_synergistic_attention_maps_kernel")


@pytest.fixture
def launches(monkeypatch):
    recorded = []
    for name in KERNELS:
        monkeypatch.setattr(op, name, _Recorder(name.removeprefix("_synergistic_attention_").removesuffix("_kernel"),
                                                recorded))
    return recorded


@pytest.mark.parametrize("seq,dim,dtype,map_mode,extra,expected", [
    (256, 64, torch.bfloat16, "per_head", {}, ["single_pass"]),
    (1, 16, torch.float16, "head_mean", {}, ["single_pass"]),
    (64, 64, torch.float32, "per_head", {}, ["fwd", "maps"]),
    (257, 64, torch.bfloat16, "per_head", {}, ["fwd", "maps"]),
    (64, 128, torch.bfloat16, "per_head", {}, ["fwd", "maps"]),
    (64, 64, torch.bfloat16, "none", {}, ["fwd"]),
    (64, 64, torch.bfloat16, "per_head", {"causal": True}, ["fwd", "maps"]),
])
def test_dispatch(seq, dim, dtype, map_mode, extra, expected, launches):
    q = torch.empty(2, 3, seq, dim, dtype=dtype)
    op.synergistic_attention_forward(q, q, q, 0.125, map_mode, torch.float32, **extra)
    assert [name for name, _, _ in launches] == expected


def test_dispatch_with_a_teacher_takes_the_flash_forward(launches):
    q = torch.empty(2, 3, 64, 64, dtype=torch.bfloat16)
    op.synergistic_attention_forward(q, q, q, 0.125, "per_head", torch.float32, teacher=torch.empty(2, 64, 64))
    assert [name for name, _, _ in launches] == ["fwd", "maps"]


@pytest.mark.parametrize("map_mode", ("per_head", "head_mean"))
@pytest.mark.parametrize("seq", (64, 200))
def test_head_mean_runs_all_heads_of_a_query_tile_in_one_program(map_mode, seq, launches):
    bsz, heads = 4, 8
    q = torch.empty(bsz, heads, seq, 64, dtype=torch.bfloat16)
    op.synergistic_attention_forward(q, q, q, 0.125, map_mode, torch.float32)
    ((name, grid, block_m),) = launches
    maps = bsz if map_mode == "head_mean" else bsz * heads
    assert name == "single_pass" and grid == (maps * -(-seq // block_m),)
