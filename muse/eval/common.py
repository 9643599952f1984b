"""Loading a trained tokenizer for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from muse.config import Config, load_config
from muse.training.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights

if TYPE_CHECKING:
    from muse.models import MuseTokenizer


def add_model_arguments(parser) -> None:
    """--config, --checkpoint and --device: which tokenizer a tool loads, and where it runs."""
    parser.add_argument("--config", required=True, help="a shipped config name (tiny, muse_1b/stage3) or a YAML path")
    parser.add_argument("--checkpoint", help="a checkpoint file or run folder (default: the config's weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the tokenizer runs (default: cuda when available)")


def resolve_checkpoint(checkpoint: str) -> Path:
    """A checkpoint file, or a run folder's last checkpoint."""
    path = Path(checkpoint)
    file = latest_checkpoint(path) if path.is_dir() else path
    if file is None or not file.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: no such file, nor a run folder with checkpoints")
    return file


def load_tokenizer(config: str, checkpoint: str | None = None, weights: str = "ema",
                   overrides: list[str] | None = None, device: str | torch.device = "cpu") -> tuple[MuseTokenizer, Config]:
    """The config's tokenizer with a checkpoint's ``ema`` (default) or ``model`` weights; ``checkpoint``
    is a file or a run folder (its last checkpoint). Without one, the config's own (pretrained or random)
    weights are used."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    from muse.models import MuseTokenizer  # imported on use: `--help` stays fast

    cfg = load_config(config, overrides)
    model = MuseTokenizer(cfg.model)
    if checkpoint is not None:
        file = resolve_checkpoint(checkpoint)
        state = load_checkpoint(file)
        if weights not in state:
            raise ValueError(f"checkpoint {file} has no {weights!r} weights (keys: {sorted(state)})")
        load_model_weights(model, state[weights], f"checkpoint {file}")
    return model.to(device).eval(), cfg
