"""Loading a trained tokenizer for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from muse.config import Config, load_config
from muse.training.checkpoint import check_config, latest_checkpoint, load_checkpoint, load_model_weights

if TYPE_CHECKING:
    from muse.models import MuseTokenizer


def add_model_arguments(parser) -> None:
    """--config, --checkpoint / --official-checkpoint and --device: which tokenizer a tool loads, and
    where it runs."""
    parser.add_argument("--config", required=True, help="a shipped config name (tiny, muse_1b/stage3) or a YAML path")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="a checkpoint file or run folder of ours (default: the config's weights)")
    weights.add_argument("--official-checkpoint",
                         help="an official MUSE checkpoint (the released MUSE-1B model.safetensors, an "
                              "ema_model/pytorch_model.bin or its checkpoint folder), loaded strictly")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the tokenizer runs (default: cuda when available)")


def device_argument(value: str) -> str:
    """--device: a torch device that exists here (``cuda`` without a visible GPU is refused by name)."""
    import argparse

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is visible on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return value


def positive_int(value: str) -> int:
    """An argparse type for counts that must be at least 1 (``--max-images 0`` would evaluate nothing)."""
    import argparse

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_text_arguments(parser) -> None:
    """--allow-random-text-encoder, for the tools that read the text encoder."""
    parser.add_argument("--allow-random-text-encoder", action="store_true",
                        help="run even though model.text has no pretrained weights (tests, tiny configs: the "
                             "numbers then measure a random text tower)")


def require_pretrained_text(cfg: Config, allowed: bool, tool: str) -> None:
    """Refuse a randomly initialised text encoder unless ``allowed`` says so explicitly."""
    if cfg.model.text.pretrained or allowed:
        return
    raise ValueError(f"{tool}: model.text.pretrained is not set, so the text encoder would be randomly initialised "
                     f"and its results would measure noise; point model.text.pretrained at the CLIP text tower "
                     f"(the official one: CLIP-ViT-L-14-laion2B-s32B-b82K) or pass --allow-random-text-encoder")


def resolve_checkpoint(checkpoint: str) -> Path:
    """A checkpoint file, or a run folder's last checkpoint."""
    path = Path(checkpoint)
    file = latest_checkpoint(path) if path.is_dir() else path
    if file is None or not file.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: no such file, nor a run folder with checkpoints")
    return file


def load_tokenizer(config: str, checkpoint: str | None = None, weights: str = "ema",
                   overrides: list[str] | None = None, device: str | torch.device = "cpu",
                   official: str | None = None) -> tuple[MuseTokenizer, Config]:
    """The config's tokenizer with a checkpoint's ``ema`` (default) or ``model`` weights; ``checkpoint``
    is a file or a run folder (its last checkpoint); ``official``, an official MUSE checkpoint
    (``MuseTokenizer.load_official_checkpoint``). Without either, the config's own (pretrained or
    random) weights are used."""
    if checkpoint is not None and official is not None:
        raise ValueError("give a checkpoint of ours or an official one, not both")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    from muse.models import MuseTokenizer  # imported on use: `--help` stays fast

    # Evaluation never trains: only the model's checkpoint folders must exist.
    cfg = load_config(config, overrides, env_sections=("model",))
    # Whatever a checkpoint does not cover (everything, without one) starts from the config's seed:
    # two evaluations of the same weights give the same numbers.
    torch.manual_seed(cfg.train.seed)
    model = MuseTokenizer(cfg.model)
    if checkpoint is not None:
        file = resolve_checkpoint(checkpoint)
        state = load_checkpoint(file)
        if weights not in state:
            raise ValueError(f"checkpoint {file} has no {weights!r} weights (keys: {sorted(state)})")
        check_config(state, cfg, f"checkpoint {file}")
        load_model_weights(model, state[weights], f"checkpoint {file}")
    if official is not None:
        model.load_official_checkpoint(official)
    return model.to(device).eval(), cfg


def load_from_args(args) -> tuple[MuseTokenizer, Config]:
    """``load_tokenizer`` for a tool's parsed ``add_model_arguments``."""
    return load_tokenizer(args.config, args.checkpoint, device=args.device,
                          official=getattr(args, "official_checkpoint", None))


def weights_identity(args) -> str | None:
    """The file the weights come from (for cache keys and reports)."""
    official = getattr(args, "official_checkpoint", None)
    if official:
        return f"official:{official}"
    return str(resolve_checkpoint(args.checkpoint)) if args.checkpoint else None
