"""Pretrained parts from local folders, loaded strictly.

Every part is built from its folder's ``config.json`` in fp32 and its weights are copied in with
``load_state_dict(strict=True)``: a weight the folder lacks, or a weight in the part's namespace that
the module does not have, is an error naming the keys — never a random module behind a warning
(``from_pretrained`` on the wrong folder layout loads nothing and only logs a report). Weights of
other towers stored in the same checkpoint (an InternVL3 folder's language model, a CLIP folder's
image tower, a DC-AE folder's encoder) are skipped by name.

Encoder layouts (SPEC §7): the remote-code InternVL3 folder as users download it (``internvl_chat``,
vision weights under ``vision_model.`` with InternViT's own names and a fused ``qkv``), the
transformers ``-hf`` conversion (``vision_tower.`` on disk, ``model.vision_tower.`` in memory), and a
bare vision-model folder in either naming.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin")


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: {folder} is not a folder (expected a local checkpoint folder with "
                                f"config.json and weights)")
    return folder


def read_json(folder: Path, what: str) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{what}: {folder} has no config.json")
    return json.loads(file.read_text())


def _read_file(file: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if keep(key)}
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if keep(key)}


def read_state_dict(path: str | Path, keep: Callable[[str], bool] = lambda key: True,
                    what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a weights file, or of a folder holding one (single or sharded with an
    ``*.index.json``), restricted to the keys ``keep`` accepts (only those are read from disk)."""
    path = Path(path).expanduser()
    if path.is_file():
        return _read_file(path, keep)
    folder = _folder(path, what)
    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"{what}: {index.name} names {shard}, which is not in {folder}")
                state.update(_read_file(folder / shard, keep))
            return state
        if (folder / name).is_file():
            return _read_file(folder / name, keep)
    raise FileNotFoundError(f"{what}: no weights in {folder} (looked for {', '.join(_WEIGHT_FILES)} and their "
                            f"sharded *.index.json forms)")


def _describe(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the missing, unexpected and
    wrongly-shaped keys (values are copied into the module's own dtype: fp32 stays fp32)."""
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [f"{key} {tuple(state[key].shape)} (expected {tuple(own[key].shape)})" for key in own
              if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {_describe(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_describe(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} of the wrong shape: {_describe(shapes)}")
        raise ValueError(f"{what}: the weights do not match the model; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def saved_names(module: nn.Module) -> dict[str, str]:
    """Each state-dict key of a transformers model → the key transformers writes to (and reads from) a
    checkpoint. transformers ≥ 5 renames some modules in memory (DINOv3's ``layer.N`` lives at
    ``model.layer.N``) and converts back on save; this asks transformers for that conversion, so a
    checkpoint written by an older version (as the official MUSE checkpoints are) keeps its names."""
    state = module.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 saves the names it holds
        return {key: key for key in state}
    by_tensor = {id(value): key for key, value in state.items()}
    names = {}
    for saved, value in revert_weight_conversion(module, state).items():
        if id(value) not in by_tensor:
            raise NotImplementedError(f"{type(module).__name__}: transformers converts {saved!r} on save beyond a "
                                      f"rename; not supported")
        names[by_tensor[id(value)]] = saved
    return names


# --- InternViT: remote-code names <-> transformers InternVLVisionModel names -------------------------

# (remote-code name, transformers name): "{n}" is a layer index; a trailing "." renames a prefix,
# otherwise the whole key. The fused qkv is split separately.
_NAMES = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("encoder.layers.{n}.attn.proj.", "encoder.layer.{n}.attention.projection_layer."),
    ("encoder.layers.{n}.attn.q_norm.", "encoder.layer.{n}.attention.q_norm."),
    ("encoder.layers.{n}.attn.k_norm.", "encoder.layer.{n}.attention.k_norm."),
    ("encoder.layers.{n}.norm1.", "encoder.layer.{n}.layernorm_before."),
    ("encoder.layers.{n}.norm2.", "encoder.layer.{n}.layernorm_after."),
    ("encoder.layers.{n}.ls1", "encoder.layer.{n}.lambda_1"),
    ("encoder.layers.{n}.ls2", "encoder.layer.{n}.lambda_2"),
    ("encoder.layers.{n}.mlp.", "encoder.layer.{n}.mlp."),
]


def _table(pairs) -> list[tuple[str, str]]:
    """(regex, replacement) for renaming keys from the first name of each pair to the second."""
    table = []
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(r"\{n\}", r"(\d+)") + ("" if source.endswith(".") else "$")
        table.append((pattern, target.replace("{n}", r"\1")))
    return table


_REMOTE_TO_HF = _table(_NAMES)
_HF_TO_REMOTE = _table([(hf, remote) for remote, hf in _NAMES])
_REMOTE_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, table) -> str | None:
    for pattern, replacement in table:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def internvit_remote_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remote-code InternViT names → ``InternVLVisionModel`` names; the fused ``qkv`` rows are split
    into thirds (q, k, v in that order). A key neither table knows is kept as is, so that the strict
    load reports it."""
    out = {}
    for key, value in state.items():
        fused = _REMOTE_QKV.match(key)
        if fused:
            layer, kind = fused.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"encoder.layer.{layer}.attention.{name}_proj.{kind}"] = part.clone()
            continue
        renamed = _rename(key, _REMOTE_TO_HF)
        out[renamed if renamed is not None else key] = value
    return out


def internvit_hf_to_remote(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`internvit_remote_to_hf` (q, k, v projections fused back into ``qkv``)."""
    out, parts = {}, {}
    for key, value in state.items():
        split = _HF_QKV.match(key)
        if split:
            layer, name, kind = split.groups()
            parts.setdefault((layer, kind), {})[name] = value
            continue
        renamed = _rename(key, _HF_TO_REMOTE)
        out[renamed if renamed is not None else key] = value
    for (layer, kind), qkv in parts.items():
        if set(qkv) != set("qkv"):
            raise ValueError(f"encoder layer {layer}: {kind} of the q/k/v projections incomplete ({sorted(qkv)})")
        out[f"encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def is_remote_internvit(keys) -> bool:
    return any(key.startswith("encoder.layers.") or key == "embeddings.class_embedding" for key in keys)


def vision_config_from_remote(remote: dict):
    """An ``InternVLVisionConfig`` equal in architecture to a remote-code InternViT config (the
    ``vision_config`` of an ``internvl_chat`` folder). No final LayerNorm (``use_mean_pooling``): the
    official tokenizer reads the last layer's output as it is."""
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(
        hidden_size=remote["hidden_size"], num_hidden_layers=remote["num_hidden_layers"],
        num_attention_heads=remote["num_attention_heads"], intermediate_size=remote["intermediate_size"],
        hidden_act=remote.get("hidden_act", "gelu"), norm_type=remote.get("norm_type", "rms_norm"),
        layer_norm_eps=remote.get("layer_norm_eps", 1e-6), image_size=remote.get("image_size", 448),
        patch_size=remote.get("patch_size", 14), num_channels=remote.get("num_channels", 3),
        attention_bias=remote.get("qkv_bias", False), use_qk_norm=remote.get("qk_normalization", False),
        layer_scale_init_value=remote.get("initializer_factor", 0.1), use_mean_pooling=True,
    )


def _vision_config_from_hf(vision: dict):
    from transformers import InternVLVisionConfig

    vision = {k: v for k, v in vision.items() if k not in ("model_type", "architectures", "transformers_version")}
    config = InternVLVisionConfig(**vision)
    if not config.use_mean_pooling:
        raise ValueError("encoder: the vision config has use_mean_pooling=false (a final LayerNorm); the MUSE "
                         "encoder reads InternViT's last layer without one")
    return config


def load_internvit(path: str | Path):
    """``InternVLVisionModel`` in fp32 from any of the folder layouts users have (module docstring).
    Returns the model; its weights are exactly the folder's vision weights."""
    from transformers import InternVLVisionModel

    what = f"model.encoder.pretrained={path}"
    folder = _folder(path, what)
    config = read_json(folder, what)
    model_type = config.get("model_type")
    if model_type == "internvl_chat":  # remote-code full model (OpenGVLab/InternVL3-1B as downloaded)
        vision_config = vision_config_from_remote(config["vision_config"])
        prefixes, remote = ("vision_model.",), True
        others = ("language_model.", "mlp1.")
    elif model_type == "internvl":  # transformers conversion (-hf)
        vision_config = _vision_config_from_hf(config["vision_config"])
        prefixes, remote = ("vision_tower.", "model.vision_tower."), False
        others = ("language_model.", "model.language_model.", "multi_modal_projector.",
                  "model.multi_modal_projector.", "lm_head.")
    elif model_type == "intern_vit_6b":  # bare remote-code vision model
        vision_config, prefixes, remote, others = vision_config_from_remote(config), ("",), True, ()
    elif model_type == "internvl_vision":  # bare transformers vision model
        vision_config, prefixes, remote, others = _vision_config_from_hf(config), ("",), False, ()
    else:
        raise ValueError(f"{what}: config.json has model_type {model_type!r}; expected an InternVL3 folder "
                         f"(internvl_chat, or internvl from the -hf conversion) or an InternViT vision model "
                         f"(intern_vit_6b, internvl_vision)")

    state = read_state_dict(folder, lambda key: not key.startswith(others), what)
    vision = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{what}: unexpected weight {key!r} (neither vision weights under "
                             f"{' or '.join(p for p in prefixes if p)} nor another tower's)")
        vision[key[len(prefix):]] = value
    if remote:
        vision = internvit_remote_to_hf(vision)
    model = InternVLVisionModel(vision_config).float()
    load_strict(model, vision, what)
    logger.info("encoder: InternViT (%s layout, %d tensors) from %s", model_type, len(vision), folder)
    return model


# --- The other pretrained parts -------------------------------------------------------------------------

def from_pretrained_strict(cls, folder: Path, what: str, other_towers: tuple[str, ...] = (), **kwargs):
    """``cls.from_pretrained`` in fp32 (transformers applies its own key conversions), then an error
    unless every weight was loaded and every stored weight used — but for ``other_towers``' keys."""
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32, **kwargs)
    unexpected = [key for key in info["unexpected_keys"] if not key.startswith(other_towers)]
    # Entries are keys, or (key, stored shape, model shape) tuples, by transformers version.
    mismatched = [" ".join(map(str, item)) if isinstance(item, tuple) else str(item)
                  for item in info["mismatched_keys"]]
    problems = []
    if info["missing_keys"]:
        problems.append(f"{len(info['missing_keys'])} missing: {_describe(list(info['missing_keys']))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} of the wrong shape: {_describe(mismatched)}")
    if info.get("error_msgs"):
        problems.append("; ".join(map(str, info["error_msgs"])))
    if problems:
        raise ValueError(f"{what}: the folder's weights do not match {cls.__name__}; " + "; ".join(problems))
    return model.float()


def load_dinov3(path: str | Path, attn_implementation: str = "eager"):
    from transformers import DINOv3ViTModel

    what = f"model.teacher.pretrained={path}"
    read_json(_folder(path, what), what)
    return from_pretrained_strict(DINOv3ViTModel, Path(path), what, attn_implementation=attn_implementation)


def load_dcae_decoder(path: str | Path):
    """The decoder of a diffusers ``AutoencoderDC`` folder (its encoder's weights are skipped)."""
    from diffusers import AutoencoderDC

    what = f"model.decoder.pretrained={path}"
    folder = _folder(path, what)
    autoencoder = AutoencoderDC.from_config(AutoencoderDC.load_config(str(folder)))
    state = read_state_dict(folder, lambda key: not key.startswith("encoder."), what)
    decoder = autoencoder.decoder.float()
    load_strict(decoder, {key.removeprefix("decoder."): value for key, value in state.items()}, what)
    return decoder, autoencoder.config.latent_channels


def load_clip_text(path: str | Path):
    """``CLIPTextModelWithProjection`` from a CLIP folder (a whole CLIPModel's folder as published, or
    a text-only one); the image tower's weights are skipped."""
    from transformers import CLIPTextModelWithProjection

    what = f"model.text.pretrained={path}"
    read_json(_folder(path, what), what)
    return from_pretrained_strict(CLIPTextModelWithProjection, Path(path), what,
                                  other_towers=("vision_model.", "visual_projection.", "logit_scale"))
