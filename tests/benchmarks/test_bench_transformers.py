"""benchmarks.bench_transformers: GPU only; its goal check reads the measured results."""

import pytest
import torch

from benchmarks import bench_transformers
from benchmarks.common import Result


def test_exits_with_a_message_without_a_gpu(caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_transformers.main([]) == 2
    assert "no CUDA device" in caplog.text


def test_goal_lines_compare_the_capture_with_sdpa():
    def result(provider, ms):
        return Result("transformers", provider, "dinov3_h16plus", "fwd", {"B": 32}, "bfloat16", ms_median=ms)

    lines = bench_transformers.goal_lines([result("sdpa", 10.0), result("muse_last_head_mean", 11.0),
                                           result("eager_all_maps", 44.0)])
    assert lines == ["dinov3_h16plus {'B': 32} fwd: last-layer head mean 11.00 ms = 1.10x SDPA without maps "
                     "(met: goal <= 1.2x), 4.00x faster than eager with all maps"]
    assert "missed" in bench_transformers.goal_lines([result("sdpa", 10.0), result("muse_last_head_mean", 13.0)])[0]


def test_every_issue_configuration_is_listed():
    cases = bench_transformers.model_cases()
    shapes = {(c["model"], c["shape"].get("image"), c["shape"]["tokens"]) for c in cases}
    assert shapes == {("dinov3_h16plus", 224, 201), ("dinov3_h16plus", 448, 789), ("vit_large", 512, 1025),
                      ("qwen2_layer", None, 4096)}
