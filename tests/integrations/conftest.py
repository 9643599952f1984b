"""The "muse" attention registered on the Triton kernels (the interpreter on CPU), and an fp64 eager
reference: transformers' eager formula with the softmax kept in fp64 (several models' own eager
attention casts the softmax to fp32, where finfo(fp64).min overflows and fully masked rows give NaN)."""

import pytest
import torch

from muse_kernels.integrations import transformers as muse_hf
from muse_kernels.ops import synergistic_attention as op

REFERENCE = "eager_fp64"


def eager_fp64_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = (query @ key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


@pytest.fixture(scope="session", autouse=True)
def registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    # Tests run the models on the `device` fixture's device: CUDA, or CPU through the interpreter.
    muse_hf.register(backend="triton")
    AttentionInterface.register(REFERENCE, eager_fp64_attention)
    AttentionMaskInterface.register(REFERENCE, eager_mask)


class _CountingKernel:
    """Counts the launches of a Triton kernel (on ``total``'s count when given) and runs it."""

    def __init__(self, kernel, total=None):
        self.kernel, self.launches = kernel, 0
        self.total = self if total is None else total

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.total.launches += 1
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def maps_launches(monkeypatch):
    """Counts the launches of the kernels that write maps (one per map written): the maps kernel, and
    the single-pass forward that N ≤ 256 takes."""
    counter = _CountingKernel(op._synergistic_attention_maps_kernel)
    monkeypatch.setattr(op, "_synergistic_attention_maps_kernel", counter)
    monkeypatch.setattr(op, "_synergistic_attention_single_pass_kernel",
                        _CountingKernel(op._synergistic_attention_single_pass_kernel, counter))
    return counter
