"""The three-stage curriculum (SPEC §4): what each stage trains."""

from __future__ import annotations

from torch import nn

STAGES = (1, 2, 3)
# Stage 1 (topology warm-up) trains the connector and decoder; stage 2 (semantic injection) adds the
# ITC head; stage 3 (synergistic tuning) also tunes the encoder. Teacher and text encoder never train.
_TRAINABLE = {
    1: ("adapter_mlp", "muse_blocks", "to_latent", "decoder_adapter", "decoder"),
    2: ("adapter_mlp", "muse_blocks", "to_latent", "decoder_adapter", "decoder", "semantic_projector", "logit_scale"),
    3: ("encoder", "adapter_mlp", "muse_blocks", "to_latent", "decoder_adapter", "decoder", "semantic_projector",
        "logit_scale"),
}
BACKBONE = ("encoder",)


def trainable_prefixes(stage: int) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return _TRAINABLE[stage]


TOPOLOGY_PARAMS = ("q_topo", "k_topo", "q_norm", "k_norm")


def configure_stage(model: nn.Module, stage: int) -> list[str]:
    """Sets requires_grad for the stage and returns the names of the trainable parameters.

    Weights no loss can reach are frozen too: the topology weights of unsupervised blocks (the
    gradient shield keeps every loss away from them) and the semantic export of every block but the
    last. Trained, they would only drift under weight decay, and DDP would find them unused."""
    prefixes = trainable_prefixes(stage)
    supervised = getattr(model, "supervised", None)
    last_block = len(getattr(model, "muse_blocks", ())) - 1
    trainable = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        train = parts[0] in prefixes
        if train and parts[0] == "muse_blocks":
            block, group = int(parts[1]), parts[2]
            if supervised is not None and block not in supervised and group in TOPOLOGY_PARAMS:
                train = False
            # Only the last block's semantic export feeds the ITC head, which trains from stage 2 on.
            if group == "v_itc" and (block != last_block or stage == 1):
                train = False
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable
