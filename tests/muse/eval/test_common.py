"""What every evaluation tool shares: the checkpoint's config is checked, and bad arguments are named."""

import argparse

import pytest
import torch

from muse.config import load_config
from muse.eval.common import add_model_arguments, load_tokenizer, positive_int
from muse.models import MuseTokenizer
from muse.training.checkpoint import ConfigMismatch, config_record, save_checkpoint


def test_a_checkpoint_is_refused_under_a_config_of_another_architecture(tmp_path):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    weights = {k: v for k, v in MuseTokenizer(cfg.model).state_dict().items() if not k.startswith("dino_teacher.")}
    save_checkpoint({"model": weights, "ema": weights, "step": 1, **config_record(cfg)}, tmp_path, 1)
    model, _ = load_tokenizer("tiny", str(tmp_path))
    assert torch.equal(model.to_latent.weight, weights["to_latent.weight"])
    # Same weight shapes, another encoder: loading it would silently compute something else.
    with pytest.raises(ConfigMismatch, match=r"model.encoder.num_heads: checkpoint 2, config 1"):
        load_tokenizer("tiny", str(tmp_path), overrides=["model.encoder.num_heads=1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_argument_error(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_model_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--config", "tiny", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA GPU is visible on this machine; use --device cpu" in capsys.readouterr().err


def test_counts_must_be_positive():
    assert positive_int("3") == 3
    for bad, message in (("0", "at least 1, got 0"), ("-2", "at least 1, got -2"), ("x", "not an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(bad)


def test_grad_orthogonality_on_unreadable_shards_exits_2_with_the_shard_named(tmp_path, caplog):
    from muse.eval.grad_orthogonality import main

    garbage = tmp_path / "bad-000.tar"
    garbage.write_bytes(b"not a tar file at all" * 10)
    code = main(["--config", "tiny", "--shards", str(garbage), "--allow-random-text-encoder", "--device", "cpu",
                 "--batches", "1", "--batch-size", "2", "--out", str(tmp_path / "out")])
    assert code == 2 and "bad-000.tar" in caplog.text
