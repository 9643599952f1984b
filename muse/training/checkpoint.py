"""Checkpoints written atomically, the last K kept, with everything needed to resume exactly, and the
resolved config they were trained with (so that a different config is caught at resume and load time).

Failure modes and what they give: a failed write (disk full, no permission) leaves no temporary file
and raises :class:`CheckpointError` naming the file; a damaged file (truncated, garbage) raises
:class:`CheckpointError` naming it when loaded, and :func:`load_newest_readable` falls back to the
newest checkpoint that loads; a checkpoint trained with another model config or stage raises
:class:`ConfigMismatch` listing the differing keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("muse.training")

_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be written or read."""


class ConfigMismatch(ValueError):
    """A checkpoint was trained with a config that differs where it matters."""


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
    checkpoints untouched and no file under a checkpoint's name. A failed write removes the temporary
    file and raises :class:`CheckpointError`. Older checkpoints beyond ``keep_last`` go (0: keep all)."""
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {path} ({type(err).__name__}: {err}); is the disk "
                              "full or the folder read-only? The previous checkpoints are intact.") from err
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
        log.info("removed old checkpoint %s", old)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint's state; :class:`CheckpointError` naming the file when it is missing or damaged."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - torch reports damage as OSError, RuntimeError, EOFError, pickle errors
        raise CheckpointError(f"checkpoint {path} cannot be read, it is damaged or incomplete "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def load_newest_readable(directory: str | os.PathLike, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint of ``directory`` that loads, and its state; None without checkpoints.
    Damaged newer ones are renamed ``*.damaged`` (kept for inspection, never picked again) with a
    warning; if none loads, :class:`CheckpointError` lists them."""
    found = list_checkpoints(directory)
    damaged = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as err:
            damaged.append(path)
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        for bad in damaged:
            bad.rename(bad.with_name(bad.name + ".damaged"))
        if damaged:
            log.warning("resuming from %s, the newest checkpoint that loads; the damaged newer one(s) were "
                        "renamed: %s", path, ", ".join(f"{p.name}.damaged" for p in damaged))
        return path, state
    if damaged:
        raise CheckpointError(f"none of the {len(damaged)} checkpoints in {directory} can be read "
                              f"({', '.join(p.name for p in damaged)})")
    return None


def load_file_or_newest(path: str | os.PathLike, what: str, map_location="cpu") -> tuple[Path, dict]:
    """A checkpoint file, or a run folder's newest readable checkpoint, and its state; ``what`` names
    the argument in the errors (a folder without checkpoints, a path that does not exist)."""
    path = Path(path)
    if path.is_dir():
        found = load_newest_readable(path, map_location)
        if found is None:
            raise FileNotFoundError(f"{what}: no checkpoint in {path}")
        return found
    if path.exists():
        return path, load_checkpoint(path, map_location)
    raise FileNotFoundError(f"{what}: no checkpoint file or run folder at {path}")


# ------------------------------------------------------------------------------ the config a run used

# Model keys that do not change what the weights mean: local paths, how the same function is computed,
# the input resolution, the training target and stage-dependent training settings.
_FREE_MODEL_KEYS = {"pretrained", "random_init", "tokenizer", "seed", "backend", "fused_topology", "image_size",
                    "grad_scale", "supervise", "topo_reduction", "teacher_layout", "logit_scale_init", "max_length"}


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_record(cfg) -> dict:
    """What a checkpoint stores about its config: the resolved values and their hash."""
    resolved = dataclasses.asdict(cfg)
    text = json.dumps(resolved, sort_keys=True, default=str)
    return {"config": json.loads(text), "config_hash": hashlib.sha256(text.encode()).hexdigest()}


def _architecture_key(key: str) -> bool:
    # The teacher is frozen and not in checkpoints: its sizes do not describe the weights.
    return (key.startswith("model.") and not key.startswith("model.teacher.")
            and key.rsplit(".", 1)[-1] not in _FREE_MODEL_KEYS)


def check_config(state: dict, cfg, where: str, purpose: str = "load") -> None:
    """Refuse a checkpoint trained with another architecture (model sizes, heads, blocks, decoder) —
    and, for ``purpose="resume"``, another stage — listing the differing keys; other differences at
    resume are logged. ``purpose="init"`` needs an earlier stage's checkpoint. Checkpoints that
    predate config records pass with a warning."""
    saved = state.get("config")
    if saved is None:
        log.warning("%s records no config: cannot check that it was trained with this one", where)
        return
    record = config_record(cfg)
    ours, theirs = _flat(record["config"]), _flat(saved)
    saved_stage, stage = theirs.get("train.stage"), ours.get("train.stage")
    if purpose == "init" and saved_stage is not None and saved_stage >= stage:
        raise ConfigMismatch(f"{where} is a stage-{saved_stage} checkpoint: stage {stage} starts from an "
                             "earlier stage's weights")
    if state.get("config_hash") == record["config_hash"]:
        return
    differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    refused = [k for k in differing if _architecture_key(k) or (purpose == "resume" and k == "train.stage")]
    if refused:
        listed = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, config {ours.get(k)!r}" for k in refused)
        raise ConfigMismatch(f"{where} was trained with a different config ({listed}); use the config it was "
                             "trained with")
    others = differing if purpose == "resume" else []
    if others:
        log.warning("%s was trained with different values of %s; continuing with this config's", where,
                    ", ".join(f"{k} ({theirs.get(k)!r} → {ours.get(k)!r})" for k in others[:10])
                    + (f" and {len(others) - 10} more" if len(others) > 10 else ""))


FROZEN_PREFIXES = ("dino_teacher.",)


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
