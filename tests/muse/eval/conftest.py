"""Shared by the evaluation tools' tests: one randomly initialised tiny tokenizer, saved as a run."""

import pytest
import torch

from muse.config import load_config
from muse.models import MuseTokenizer
from muse.training.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A run folder holding one checkpoint (EMA and raw weights) of a random tiny tokenizer."""
    run = tmp_path_factory.mktemp("tiny_tokenizer") / "run"
    torch.manual_seed(0)
    model = MuseTokenizer(load_config("tiny").model)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    save_checkpoint({"ema": weights, "model": weights, "step": 1}, run, 1)
    return run
