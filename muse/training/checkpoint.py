"""Checkpoints written atomically, the last K kept, with everything needed to resume exactly."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("muse.training")

_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) generator states, as tensors and plain values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp`` files are not checkpoints)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(state: dict, directory: str | os.PathLike, step: int, keep_last: int = 3) -> Path:
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write leaves the previous
    checkpoints untouched and no file under a checkpoint's name. Older ones beyond ``keep_last`` go."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
        log.info("removed old checkpoint %s", old)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


FROZEN_PREFIXES = ("teacher.",)


def load_model_weights(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load a checkpoint's weights; checkpoints leave the frozen teacher out, everything else must match."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{where} does not fit this model (a different config?): {err}") from None
    missing = [k for k in result.missing_keys if not k.startswith(FROZEN_PREFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{where} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
