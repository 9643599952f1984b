"""Official MUSE checkpoints in and out (SPEC §7 "Checkpoint layout").

An official checkpoint is the state dict of the official ``MUSE_ViT``: our module names everywhere
(``adapter_mlp``, ``muse_blocks``, ``to_latent``, ``semantic_projector``, ``logit_scale``, ``decoder``,
``dino_teacher``, ``dino_mean``/``dino_std``) except the encoder, which the official code keeps in
InternViT's remote-code names (fused ``qkv``). Stage-1 checkpoints (``use_active_itc: False``) hold
no ITC head; a folder from the official trainer holds ``checkpoint-N/ema_model/pytorch_model.bin``
(preferred: each stage starts from the EMA weights), ``checkpoint-N/unwrapped_model/...``, or a final
``model.safetensors``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from muse.models.pretrained import (internvit_hf_to_remote, internvit_remote_to_hf, is_remote_internvit,
                                    load_strict, read_state_dict, saved_names)

logger = logging.getLogger(__name__)

ENCODER = "encoder."
# The ITC head exists from stage 2 on: a stage-1 checkpoint has none of these keys.
ITC_HEAD = ("semantic_projector.", "logit_scale")
_FOLDER_FILES = ("model.safetensors", "ema_model/model.safetensors", "ema_model/pytorch_model.bin",
                 "pytorch_model.bin", "unwrapped_model/model.safetensors", "unwrapped_model/pytorch_model.bin")


def official_file(path: str | Path) -> Path:
    """The weights file of an official checkpoint: the path itself, or the first of
    ``model.safetensors``, ``ema_model/…``, ``pytorch_model.bin``, ``unwrapped_model/…`` in a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"official checkpoint: {path} does not exist")
    for name in _FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"official checkpoint: {path} holds none of {', '.join(_FOLDER_FILES)}")


TEACHER = "dino_teacher."


def _rename_teacher(model: nn.Module, state: dict[str, torch.Tensor], to_saved: bool) -> dict[str, torch.Tensor]:
    """The teacher's keys between our module's names and the names transformers writes (the official
    checkpoint's); identity where transformers renames nothing."""
    if getattr(model, "dino_teacher", None) is None:  # the structural teacher has no weights
        return state
    names = {TEACHER + own: TEACHER + saved for own, saved in saved_names(model.dino_teacher).items()}
    if not to_saved:
        names = {saved: own for own, saved in names.items()}
    return {names.get(key, key): value for key, value in state.items()}


def is_official_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an official checkpoint rather than one of ours (``step_*.pt`` files holding
    ``model``/``ema`` state dicts): a ``.safetensors``/``.bin`` file, a ``.pt`` holding a flat state
    dict, or a folder with an official weights file and no checkpoint of ours."""
    path = Path(path).expanduser()
    if path.is_dir():
        return not any(path.glob("step_*.pt")) and any((path / name).is_file() for name in _FOLDER_FILES)
    if path.suffix in (".safetensors", ".bin"):
        return path.is_file()
    if path.suffix == ".pt" and path.is_file():
        try:
            state = torch.load(path, map_location="meta", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged file is for the caller's loader to report
            return False
        return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())
    return False


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    encoder = {k[len(ENCODER):]: v for k, v in state.items() if k.startswith(ENCODER)}
    rest = {k: v for k, v in state.items() if not k.startswith(ENCODER)}
    return encoder, rest


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official state dict in our names for the encoder (remote-code InternViT → transformers);
    :func:`load_official` also maps the teacher's keys to the names transformers holds in memory."""
    encoder, rest = _split(state)
    if encoder and is_remote_internvit(encoder):
        encoder = internvit_remote_to_hf(encoder)
    return rest | {ENCODER + k: v for k, v in encoder.items()}


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    encoder, rest = _split(state)
    return rest | {ENCODER + k: v for k, v in internvit_hf_to_remote(encoder).items()}


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout: loadable by the official ``MUSE_ViT`` (strictly,
    with the same components)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return ours_to_official(_rename_teacher(model, state, to_saved=True))


def load_official(model: nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Loads an official checkpoint into ``model`` (a :class:`MuseTokenizer`). With ``strict`` every
    key must match by name and shape, except that a checkpoint with no ITC head at all (stage 1)
    leaves the model's head at its initialisation, which is logged. Returns ``{"file", "missing",
    "unexpected"}`` (both lists empty under ``strict``)."""
    file = official_file(path)
    state = _rename_teacher(model, official_to_ours(read_state_dict(file, what=f"official checkpoint {file}")),
                            to_saved=False)
    own = model.state_dict()
    itc_keys = [k for k in own if k.startswith(ITC_HEAD)]
    missing_itc = [k for k in itc_keys if k not in state]
    if missing_itc and len(missing_itc) == len(itc_keys):
        logger.info("%s has no ITC head (a stage-1 checkpoint): semantic_projector and logit_scale keep "
                    "their initialisation", file)
        state |= {k: own[k] for k in itc_keys}
    what = f"official checkpoint {file}"
    if strict:
        load_strict(model, state, what)
        return {"file": str(file), "missing": [], "unexpected": []}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        logger.warning("%s: %d missing keys (%s), %d unexpected (%s)", what, len(result.missing_keys),
                       ", ".join(result.missing_keys[:5]), len(result.unexpected_keys),
                       ", ".join(result.unexpected_keys[:5]))
    return {"file": str(file), "missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
