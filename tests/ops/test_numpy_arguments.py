"""numpy scalars where the API takes numbers (what np.sqrt, arrays and shape arithmetic hand back) work
like Python numbers; what is not a number is refused with a message naming the argument and its type."""

import numpy as np
import pytest
import torch

from muse_kernels import resize_attention_4d, synergistic_attention


def test_numpy_scale_equals_the_python_scale():
    q, k, v = (torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected, _ = synergistic_attention(q, k, v, scale=0.25, backend="torch")
    for scale in (np.float32(0.25), np.float64(0.25), 1 / np.sqrt(np.float32(16))):
        out, _ = synergistic_attention(q, k, v, scale=scale, backend="torch")
        torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match=r"scale must be a positive finite number.*of type Tensor"):
        synergistic_attention(q, k, v, scale=torch.tensor(0.25), backend="torch")


def test_numpy_grid_sizes_equal_python_ones():
    attn = torch.softmax(torch.randn(2, 16, 16), dim=-1)
    expected = resize_attention_4d(attn, (2, 2))
    for target in ((np.int64(2), np.int32(2)), np.array([2, 2]), torch.Size([2, 2])):
        torch.testing.assert_close(resize_attention_4d(attn, target, source_hw=np.array([4, 4])), expected)
    with pytest.raises(ValueError, match=r"target_hw must be a pair of positive ints"):
        resize_attention_4d(attn, (2.0, 2))
