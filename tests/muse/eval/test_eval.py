"""Evaluation tools: metrics against hand-computable cases, gradient orthogonality, loading errors."""

import json
import math

import numpy as np
import pytest
import torch

from muse.data import write_shards
from muse.eval import grad_orthogonality
from muse.eval.common import load_tokenizer
from muse.eval.metrics import psnr, ssim


def test_psnr_of_identical_and_of_a_known_offset():
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    assert torch.isinf(psnr(x, x)).all()
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01, PSNR 20 dB.
    torch.testing.assert_close(psnr(x + 0.2, x), torch.full((2,), 20.0, dtype=torch.float64))


def test_ssim_identical_constant_and_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=gen) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # Constant images have no variance: SSIM is the luminance term alone, (2ab + C1) / (a² + b² + C1).
    a, b = torch.full((1, 3, 16, 16), 0.25), torch.full((1, 3, 16, 16), -0.25)  # 0.625 and 0.375 in [0, 1]
    expected = (2 * 0.625 * 0.375 + 1e-4) / (0.625**2 + 0.375**2 + 1e-4)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)
    noise = torch.randn(x.shape, generator=gen)
    mild, strong = ssim((x + 0.1 * noise).clamp(-1, 1), x), ssim((x + 0.5 * noise).clamp(-1, 1), x)
    assert (strong < mild).all() and (mild < 1).all()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    write_shards(({"image": rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "caption": f"thing {i}"}
                  for i in range(8)), root / "shards", samples_per_shard=4)
    return root


def test_orthogonality_muse_zero_on_qk_naive_not(tiny_run, tmp_path, tiny_checkpoint):
    args = ["--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--shards", str(tiny_run / "shards" / "*.tar"),
            "--batches", "2", "--batch-size", "4"]
    # The tiny config's text encoder is random: the ITC gradients would be noise unless asked for.
    assert grad_orthogonality.main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
    assert grad_orthogonality.main([*args, "--allow-random-text-encoder", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "orthogonality.json").read_text())
    table = {(r["variant"], r["pair"], r["group"]): r for r in rows}
    # Reconstruction and ITC cannot reach MUSE's Q/K: exactly 0, batch after batch.
    assert table[("muse", "rec|itc", "qk")]["values"] == [0.0, 0.0]
    assert table[("muse", "rec|topo", "qk")]["values"] == [0.0, 0.0]
    # Without the shield the reconstruction gradient does reach Q/K.
    assert all(v != 0.0 for v in table[("naive", "rec|topo", "qk")]["values"])
    assert all(-1 <= r["mean"] <= 1 and not math.isnan(r["mean"]) for r in rows)
    # Different batches give different measurements.
    assert table[("naive", "rec|topo", "qk")]["values"][0] != table[("naive", "rec|topo", "qk")]["values"][1]
    assert (tmp_path / "orthogonality.png").exists()


def test_loading_errors_are_clear(tiny_run, tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="no such file, nor a run folder"):
        load_tokenizer("tiny", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_tokenizer("tiny", str(tiny_checkpoint), overrides=["model.dim=32"])
    assert grad_orthogonality.main(["--config", "tiny", "--checkpoint", str(tmp_path / "nope"), "--shards",
                                    str(tiny_run / "shards" / "*.tar"), "--out", str(tmp_path)]) == 2


def test_attention_maps_tool(tiny_run, tmp_path, tiny_checkpoint):
    from PIL import Image

    from muse.eval import attention_maps

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (50, 40), (40 * i, 100, 200)).save(folder / f"{i}.png")
    args = ["--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--images", str(folder)]
    assert attention_maps.main([*args, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "attention_kl.json").read_text())
    assert [r["image"] for r in report] == ["0.png", "1.png"] and all(r["query"] == [2, 2] for r in report)
    assert all(len(r["kl_per_block"]) == 2 and len(r["kl_per_block_head"]) == 2 for r in report)
    assert all(len(heads) == 4 for r in report for heads in r["kl_per_block_head"])  # tiny: 4 heads
    assert all(v >= 0 for r in report for v in r["kl_per_block"])
    panel = Image.open(tmp_path / "out" / "0_attention.png")
    # image, teacher, head mean, overlay, 4 heads; 2 blocks; 32-pixel tiles enlarged to 128; labels.
    assert panel.size == (60 + 8 * 128, 18 + 2 * 128)
    assert attention_maps.main([*args, "--query", "0,3", "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "attention_kl.json").read_text())[0]["query"] == [0, 3]
    assert attention_maps.main([*args, "--query", "4,0", "--out", str(tmp_path / "bad")]) == 2  # 4x4 grid
    assert attention_maps.main(["--config", "tiny", "--images", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2


def test_attention_maps_match_the_models_own_maps(tiny_run, tiny_checkpoint):
    from muse.eval.attention_maps import attention_maps

    model, _ = load_tokenizer("tiny", str(tiny_checkpoint))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    teacher, student, grid = attention_maps(model, images)
    out = model(images, return_maps=True)  # tiny: head-mean maps, every block when maps are asked for
    assert grid == (4, 4) and [m.shape for m in student] == [(2, 4, 16, 16)] * 2
    torch.testing.assert_close(teacher, out.teacher_maps)
    for per_head, mean in zip(student, out.maps):
        torch.testing.assert_close(per_head.mean(1), mean.float(), rtol=1e-5, atol=1e-6)


def test_per_image_kl_by_hand():
    from muse.eval.attention_maps import per_image_kl

    t = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    s = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert per_image_kl(t, s).item() == pytest.approx(expected, abs=1e-7)
    per_head = per_image_kl(t, torch.stack([s, t], dim=1))  # a second head equal to the teacher: KL 0
    assert per_head.shape == (1, 2) and per_head[0, 0].item() == pytest.approx(expected, abs=1e-7)
    assert per_head[0, 1].item() == pytest.approx(0.0, abs=1e-7)


def test_reconstruct_tool_from_shards_and_images(tiny_run, tmp_path, tiny_checkpoint):
    from PIL import Image

    from muse.eval.__main__ import main as muse_eval

    out = tmp_path / "from_shards"
    assert muse_eval(["reconstruct", "--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--shards",
                      str(tiny_run / "shards" / "*.tar"), "--metrics", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 8 and len(list(out.glob("*_recon.png"))) == 8
    assert report["psnr"] == pytest.approx(float(np.mean([r["psnr"] for r in report["per_image"]])))
    assert Image.open(next(out.glob("*_recon.png"))).size == (64, 32)  # input | reconstruction
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (48, 40), (10, 200, 30)).save(folder / "green.png")
    assert muse_eval(["reconstruct", "--config", "tiny", "--images", str(folder), "--out", str(tmp_path / "i")]) == 0
    assert (tmp_path / "i" / "green_recon.png").exists()
    assert muse_eval(["nope"]) == 2
    assert muse_eval(["reconstruct", "--config", "tiny", "--images", str(tmp_path / "missing"),
                      "--out", str(tmp_path)]) == 2


def test_official_checkpoint_evaluates_like_ours(tmp_path, tiny_checkpoint):
    from muse.models.official import to_official_state_dict

    model, _ = load_tokenizer("tiny", str(tiny_checkpoint))
    with torch.no_grad():  # weights no seeded initialisation reproduces: only loading them can match
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save(to_official_state_dict(model), tmp_path / "pytorch_model.bin")
    official, _ = load_tokenizer("tiny", official=str(tmp_path / "pytorch_model.bin"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours_out, official_out = model.features(images), official.features(images)
    torch.testing.assert_close(official_out.semantic, ours_out.semantic)
    torch.testing.assert_close(official.decode(official.encode(images)), model.decode(model.encode(images)))
    with pytest.raises(ValueError, match="not both"):
        load_tokenizer("tiny", str(tiny_checkpoint), official=str(tmp_path / "pytorch_model.bin"))
