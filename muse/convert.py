"""muse-convert: official MUSE checkpoints to ours and back.

    muse-convert official-to-ours MUSE-1B/model.safetensors runs/muse_1b_official --config muse_1b/stage3
    muse-convert ours-to-official runs/muse_1b/stage3 MUSE-ours/model.safetensors --config muse_1b/stage3

``official-to-ours`` checks the official file strictly against the config's architecture (every key by
name and shape) and writes a checkpoint our tools read (``--checkpoint`` of ``muse-eval``,
``train.init_weight``) with the config it belongs to. The official file carries every part (encoder,
decoder, teacher), so no part's folder is read. ``ours-to-official`` writes the official layout (a
``model.safetensors`` the official ``MUSE_ViT`` loads), taking the teacher — which our checkpoints leave
out — from the config's ``model.teacher.pretrained``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from muse.config import load_config

log = logging.getLogger("muse.convert")
# The parts an official checkpoint holds: built at their sizes, then overwritten by its weights.
OFFICIAL_PARTS = ("encoder", "teacher", "decoder")


def official_config(config: str, overrides: list[str] | None = None):
    """The config with random initialisation for the parts an official checkpoint carries (their
    folders are not needed) and only the model section's paths required."""
    parts = [f"model.{part}.{key}" for part in OFFICIAL_PARTS for key in ("pretrained=none", "random_init=true")]
    return load_config(config, [*(overrides or []), *parts], env_sections=("model",))


def official_to_ours(source: str, target: str, config: str, overrides: list[str] | None = None) -> Path:
    """Writes ``target/step_00000000.pt``: a run folder that ``--checkpoint`` and ``train.init_weight``
    take."""
    from muse.models import MuseTokenizer
    from muse.training.checkpoint import FROZEN_PREFIXES, config_record, save_checkpoint

    cfg = official_config(config, [*(overrides or []), "model.text.pretrained=none", "model.text.random_init=true"])
    model = MuseTokenizer(cfg.model)
    info = model.load_official_checkpoint(source)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}
    state = {"model": weights, "ema": weights, "step": 0, "stage": cfg.train.stage, "source": info["file"],
             **config_record(cfg)}
    path = save_checkpoint(state, target, 0, keep_last=0)
    log.info("wrote %s (%d tensors from %s)", path, len(weights), info["file"])
    return path


def ours_to_official(source: str, target: str, config: str, overrides: list[str] | None = None,
                     weights: str = "ema") -> Path:
    from safetensors.torch import save_file

    from muse.eval.common import load_tokenizer
    from muse.models.official import to_official_state_dict

    model, _ = load_tokenizer(config, source, weights=weights, overrides=overrides)
    state = {k: v.contiguous() for k, v in to_official_state_dict(model).items()}
    path = Path(target)
    if path.suffix != ".safetensors":
        path = path / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    log.info("wrote %s (%d tensors, official layout)", path, len(state))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="muse-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=("official-to-ours", "ours-to-official"))
    parser.add_argument("source", help="official: a .safetensors/.bin/.pt file or checkpoint folder; ours: a "
                                       "checkpoint file or run folder")
    parser.add_argument("target", help="official-to-ours: a run folder to write step_00000000.pt into; "
                                       "ours-to-official: a .safetensors file or a folder for model.safetensors")
    parser.add_argument("--config", default="muse_1b/stage3", help="the architecture (default: muse_1b/stage3)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="ours-to-official: which of our checkpoint's weights (default: ema)")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.direction == "official-to-ours":
            official_to_ours(args.source, args.target, args.config, args.overrides)
        else:
            ours_to_official(args.source, args.target, args.config, args.overrides, args.weights)
    except (FileNotFoundError, ValueError) as error:
        print(f"muse-convert: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
