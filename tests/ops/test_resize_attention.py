"""Ψ (resize_attention_4d) against two passes of F.interpolate and a renormalization."""

import pytest
import torch
import torch.nn.functional as F

from helpers import make_teacher
from muse_kernels import resize_attention_4d


def two_pass_interpolate(attn, source_hw, target_hw):
    bsz, tokens, _ = attn.shape
    (hs, ws), (ht, wt) = source_hw, target_hw
    keys = F.interpolate(attn.reshape(bsz * tokens, 1, hs, ws), size=(ht, wt), mode="bilinear",
                         align_corners=False).reshape(bsz, tokens, ht * wt)
    queries = F.interpolate(keys.transpose(1, 2).reshape(bsz * ht * wt, 1, hs, ws), size=(ht, wt),
                            mode="bilinear", align_corners=False).reshape(bsz, ht * wt, ht * wt).transpose(1, 2)
    return queries / (queries.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("source_hw,target_hw", [
    ((4, 4), (7, 7)),      # upsampling
    ((14, 14), (8, 8)),    # downsampling by a non-integer factor
    ((16, 16), (4, 4)),    # downsampling by an integer factor
    ((4, 6), (3, 5)),      # non-square grids
    ((5, 5), (5, 5)),      # same size: only the renormalization
])
def test_matches_two_pass_interpolate(source_hw, target_hw):
    attn = make_teacher(2, source_hw[0] * source_hw[1], dtype=torch.float64)
    expected = two_pass_interpolate(attn, source_hw, target_hw)
    square = source_hw[0] == source_hw[1]
    got = resize_attention_4d(attn, target_hw, None if square else source_hw)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # Rows sum to Σ/(Σ + 1e-6): just under 1 where the resize kept little mass (strong downsampling).
    assert ((got.sum(-1) - 1).abs() < 1e-4).all()


def test_fp32_and_bf16_inputs_keep_their_dtype():
    attn = make_teacher(3, 36)
    expected = two_pass_interpolate(attn.double(), (6, 6), (4, 4))
    torch.testing.assert_close(resize_attention_4d(attn, (4, 4)).double(), expected, rtol=1e-5, atol=1e-6)
    out = resize_attention_4d(attn.bfloat16(), (4, 4))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-3)


def test_interpolation_matrices_are_cached():
    from muse_kernels.ops.resize_attention import interpolation_matrix

    a = interpolation_matrix((6, 6), (4, 4), torch.device("cpu"), torch.float32)
    assert interpolation_matrix((6, 6), (4, 4), torch.device("cpu"), torch.float32) is a


@pytest.mark.parametrize("args,exc,match", [
    ((torch.rand(2, 10, 10), (3, 3)), ValueError, "not a square grid"),
    ((torch.rand(2, 9, 10), (3, 3)), ValueError, r"attn must be \(batch, tokens, tokens\)"),
    ((torch.rand(2, 9, 9), (3, 0)), ValueError, "target_hw must be a pair of positive ints"),
    ((torch.rand(2, 12, 12), (3, 3), (3, 3)), ValueError, "source_hw"),
    ((torch.ones(2, 9, 9, dtype=torch.int64), (3, 3)), TypeError, "floating-point"),
])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        resize_attention_4d(*args)


def test_autocast_does_not_lower_the_precision():
    attn = make_teacher(2, 36)
    expected = resize_attention_4d(attn, (4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_attention_4d(attn, (4, 4))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_maps_resized_under_fake_tensors_leave_no_fake_matrix_in_the_cache():
    """A FLOP count (fake tensors) must not poison later real calls with cached fake matrices."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    source, target = (5, 7), (3, 4)
    with FakeTensorMode() as fake:
        resized = resize_attention_4d(fake.from_tensor(make_teacher(1, 35, dtype=torch.float32)), target, source)
    assert resized.shape == (1, 12, 12)
    attn = make_teacher(2, 35, dtype=torch.float32)
    out = resize_attention_4d(attn, target, source)
    assert type(out) is torch.Tensor
    ref = two_pass_interpolate(attn.double(), source, target)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
