"""The FLOP/byte tool: hand counts for one Synergistic block and one convolution (grouped and
transposed, forward+backward, with the corrected weight-gradient count), bytes of single ops, the CUDA
autocast policy, and the whole step on the tiny and the MUSE-1B configs (fake tensors)."""

import json
import math

import pytest
import torch
from torch import nn

from benchmarks import flops as F
from muse.models import SynergisticBlock


def _flops(tally, phase=None):
    return sum(v for (p, _), v in tally.flops.items() if phase in (None, p))


# ------------------------------------------------------------------------------- one Synergistic block

def test_synergistic_block_forward_and_backward_hand_count():
    B, N, C, H = 2, 16, 64, 4
    d, hidden = C // H, int(2 * 4.0 * C / 3)
    torch.manual_seed(0)
    block = SynergisticBlock(C, num_heads=H, backend="torch")
    x = torch.randn(B, N, C, requires_grad=True)
    with F.Counting(cross_check=True) as counting:
        out = block(x)
        (out.x.sum() + out.v_itc.sum()).backward()
    linear = 2 * B * N * C * C  # one C → C projection
    mlp = 3 * 2 * B * N * C * hidden  # w1, w2 (C → hidden) and w3 (hidden → C)
    attention = 4 * B * H * N * N * d  # Q·Kᵀ and A·V
    forward = 4 * linear + linear + mlp + attention  # q_topo, k_topo, v_sem, proj; v_itc; SwiGLU
    # The gradient shield: the output gradient reaches V only, so Q·Kᵀ, q_topo and k_topo have no
    # backward; A·V's backward is dV = Aᵀ·dO alone. Every other linear: dX and dW, each its forward's.
    backward = 2 * (linear * 3 + mlp) + 2 * B * H * N * N * d
    assert _flops(counting.total, "fwd") == forward
    assert _flops(counting.total, "bwd") == backward
    assert counting.flop_counter_total == forward + backward


# ------------------------------------------------------------------------------- one convolution

@pytest.mark.parametrize("groups", [1, 4, 8])
def test_convolution_forward_backward_hand_count(groups):
    B, cin, cout, k, size = 2, 8, 16, 3, 10
    conv = nn.Conv2d(cin, cout, k, padding=1, groups=groups, bias=False)
    x = torch.randn(B, cin, size, size, requires_grad=True)
    corrected, stock = F.Counting(cross_check=True), F.Counting(corrected=False, cross_check=True)
    for counting in (corrected, stock):
        with counting:
            conv(x).sum().backward()
    forward = 2 * B * size * size * cout * (cin // groups) * k * k
    assert _flops(corrected.total, "fwd") == forward
    # The input gradient and the weight gradient each cost the forward's multiply-adds.
    assert _flops(corrected.total, "bwd") == 2 * forward
    assert corrected.flop_counter_total == 3 * forward
    # torch 2.13's formula counts the weight gradient over all input channels: groups times too many.
    assert stock.flop_counter_total == forward + forward + groups * forward


def test_transposed_grouped_convolution_backward_hand_count():
    B, cin, cout, k, size, groups = 2, 8, 12, 4, 6, 2
    conv = nn.ConvTranspose2d(cin, cout, k, stride=2, padding=1, groups=groups, bias=False)
    x = torch.randn(B, cin, size, size, requires_grad=True)
    with F.Counting(cross_check=True) as counting:
        conv(x).sum().backward()
    # Every input pixel meets every weight element of its group once.
    forward = 2 * B * size * size * cin * (cout // groups) * k * k
    assert _flops(counting.total, "fwd") == forward
    assert _flops(counting.total, "bwd") == 2 * forward


def test_frozen_convolution_counts_only_the_input_gradient():
    conv = nn.Conv2d(4, 8, 3, groups=4, bias=False).requires_grad_(False)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    with F.Counting() as counting:
        conv(x).sum().backward()
    forward = 2 * 1 * 3 * 3 * 8 * 1 * 9
    assert _flops(counting.total, "bwd") == forward


# ------------------------------------------------------------------------------- bytes and dtypes

def test_bytes_are_inputs_plus_outputs_views_free_expanded_read_once():
    x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
    with F.Counting() as counting:
        torch.nn.functional.linear(x, w, b)  # t() is a view; addmm reads x, w, b and writes (5, 3)
    assert counting.total.total_bytes() == 4 * (5 * 7 + 3 * 7 + 3 + 5 * 3)
    row = torch.randn(1, 64)
    assert F.tensor_bytes(row.expand(32, 64)) == 64 * 4
    assert F.tensor_bytes(torch.randn(8, 6).t()) == 8 * 6 * 4
    with F.Counting() as counting:
        torch.randn(32, 64) + row.expand(32, 64)
    adds = 32 * 64 * 4 * 2 + 64 * 4
    randn = 32 * 64 * 4
    assert counting.total.total_bytes() == adds + randn


def test_cuda_autocast_policy_runs_norms_and_softmax_in_fp32():
    x = torch.randn(4, 8)
    with F.CudaAutocastPolicy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.nn.functional.linear(x, torch.randn(8, 8))
            assert h.dtype == torch.bfloat16  # matmuls: CPU autocast already gives bf16
            assert torch.softmax(h, -1).dtype == torch.float32
            assert torch.nn.functional.layer_norm(h, (8,)).dtype == torch.float32
            assert torch.nn.functional.rms_norm(h, (8,)).dtype == torch.float32
            assert h.sum().dtype == torch.float32
            assert (h + h).dtype == torch.bfloat16  # elementwise ops keep their inputs' dtype
        assert torch.softmax(h, -1).dtype == torch.bfloat16  # autocast off: nothing changes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.softmax(h, -1).dtype == torch.bfloat16  # CPU's own policy, without ours


def test_precision_of_flops():
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(8, 8)
    with F.Counting() as counting:
        conv(torch.randn(1, 3, 8, 8))
        lin(torch.randn(2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(torch.randn(2, 8))
    assert set(counting.total.flops_by_precision()) == {"tf32", "fp32", "bf16"}
    with F.Counting(tf32_matmul=True) as counting:
        lin(torch.randn(2, 8))
    assert set(counting.total.flops_by_precision()) == {"tf32"}


def test_roofline_takes_the_slower_of_compute_and_memory():
    hw = F.Hardware("test", bf16_tflops=100.0, tf32_tflops=50.0, fp32_tflops=10.0, bandwidth_tbps=1.0)
    tally = F.Tally()
    tally.flops[("fwd", "bf16")] = 1e12  # 10 ms at 100 TFLOP/s
    tally.flops[("bwd", "fp32")] = 1e11  # 10 ms at 10 TFLOP/s
    tally.bytes["fwd"] = 5e9  # 5 ms at 1 TB/s
    row = F.roofline(tally, hw)
    assert math.isclose(row["compute_ms"], 20.0) and math.isclose(row["memory_ms"], 5.0)
    assert row["roofline_ms"] == row["compute_ms"] and row["bound"] == "compute"
    tally.bytes["bwd"] = 30e9
    assert F.roofline(tally, hw)["bound"] == "memory"


# ------------------------------------------------------------------------------- the whole step

def _check_partition(report):
    """Components and ``other`` add up to the total; nothing is attributed twice or negative."""
    rows = report["components"].values()
    assert report["overlapping_ops"] == 0
    assert math.isclose(sum(r["tflop"] for r in rows), report["total"]["tflop"], rel_tol=1e-9)
    assert math.isclose(sum(r["gb"] for r in rows), report["total"]["gb"], rel_tol=1e-9)
    other = report["components"]["other"]
    assert other["tflop"] >= -1e-12 and other["gb"] >= -1e-9


# ConvNeXt-S (its 36 blocks, three passes) is most of the tiny step's ops; LPIPS stays.
FAST = ["loss.convnext_weight=0"]


def test_tool_on_the_tiny_config(tmp_path):
    out = tmp_path / "flops.json"
    args = ["--config", "tiny/stage1", "--batch", "2", "--image-size", "32", "--stages", "1", "3", "--json", str(out)]
    assert F.main([*args, "--set", *FAST]) == 0
    data = json.loads(out.read_text())
    stages = {s["stage"]: s for s in data["stages"]}
    assert sorted(stages) == [1, 3] and data["hardware"]["bandwidth_tbps"] == 3.0 and data["overrides"] == FAST
    for stage, report in stages.items():
        _check_partition(report)
        rows = report["components"]
        assert report["config"] == f"tiny/stage{stage}"
        assert rows["teacher"]["passes"] == "fwd" and rows["teacher"]["tflop"] > 0
        assert rows["encoder"]["passes"] == ("fwd+bwd" if stage == 3 else "fwd")
        for part in ("connector", "decoder", "perceptual"):
            assert rows[part]["passes"] == "fwd+bwd"
        assert (rows["discriminator"]["tflop"] > 0) == (stage == 3)
        assert (rows["text"]["tflop"] > 0) == (stage > 1)  # ITC from stage 2
        assert rows["optimizer"]["gb"] > 0 and rows["optimizer"]["passes"] == "step"
        assert rows["perceptual"]["tflop_by_precision"].get("bf16", 0) == 0  # losses with autocast off
        for row in rows.values():
            assert row["roofline_ms"] == max(row["compute_ms"], row["memory_ms"])
        total = report["total"]
        assert math.isclose(total["roofline_ms"], sum(r["roofline_ms"] for r in rows.values()))


def test_tiny_step_flops_equal_flop_counter_mode():
    count = F.count_stage("tiny/stage3", 3, batch=2, image_size=32, cross_check=True, overrides=FAST)
    assert count.total.total_flops() == count.flop_counter_total > 0


def test_a_count_leaves_no_fake_tensor_in_library_caches():
    """transformers' DINOv3 caches its patch coordinates per grid (an lru_cache): a count on fake
    tensors must not leave fake ones there for the real forwards that follow in the process."""
    from torch._subclasses.fake_tensor import FakeTensor

    from muse.config import load_config
    from muse.models import MuseTokenizer

    F.count_stage("tiny/stage1", 1, batch=2, image_size=32, overrides=FAST)
    cfg = load_config("tiny/stage1")
    assert cfg.model.teacher.kind == "dinov3"
    out = MuseTokenizer(cfg.model)(torch.rand(2, 3, 32, 32), return_maps=True)
    assert not isinstance(out.teacher_maps, FakeTensor) and not isinstance(out.loss_topo, FakeTensor)
    assert torch.isfinite(out.loss_topo)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        F.main(["--batch", "0"])
    assert "--batch must be positive, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def muse_1b_stage2():
    return F.stage_report(F.count_stage("muse_1b/stage2", 2, batch=32, image_size=224), F.PRESETS["h100"])


def test_muse_1b_stage2_step(muse_1b_stage2):
    report = muse_1b_stage2
    _check_partition(report)
    rows = report["components"]
    B, tokens = 32, (224 // 14) ** 2 + 1  # InternViT-300M at 224²: 256 patches and CLS
    layer = 4 * 1024 * 1024 + 2 * 1024 * 4096  # q, k, v, out; fc1, fc2
    encoder = 2 * B * tokens * layer * 24 + 4 * B * 16 * tokens ** 2 * 64 * 24 + 2 * B * 256 * 1024 * 3 * 14 * 14
    assert math.isclose(rows["encoder"]["tflop"] * 1e12, encoder, rel_tol=1e-6)
    assert rows["encoder"]["passes"] == "fwd"  # frozen in stage 2
    # The count: ~72 TFLOP, the decoder ~50 of it, the connector ~0.2.
    assert 55 < report["total"]["tflop"] < 90
    assert 45 < rows["decoder"]["tflop"] < 55
    assert 0.1 < rows["connector"]["tflop"] < 0.5
    assert rows["decoder"]["bound"] == "memory"
    assert report["trainable_parameters"] > 100e6
