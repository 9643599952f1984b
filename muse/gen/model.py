"""The generator: diffusers' ``SanaTransformer2DModel`` (SANA's linear DiT, the paper's Appendix-B choice)
on normalised MUSE latents, conditioned on a class or on caption embeddings.

How the condition enters: SANA reads its condition through ``encoder_hidden_states`` — a caption
projection (an MLP to the transformer's width), an RMSNorm, and cross-attention in every block.
A class is one token of that sequence: row ``cls`` of an ``nn.Embedding(num_classes + 1,
caption_channels)``, the last row being the null class that classifier-free guidance drops to.
Cross-attention over a single key is softmax-free (its one weight is 1), so each block adds a learned
function of the class to its hidden states (to_out(to_v(token))), on top of which the timestep drives
the adaLN modulation as in SANA. Text: the caption embeddings (B, L, caption_channels) with their
mask, a learned null token in place of a dropped caption.

The timestep t ∈ [0, 1] of eq. 6 goes to SANA's timestep embedding as 1000·t, the scale its released
models are trained at (diffusers' flow-matching schedulers pass ``timesteps = 1000·σ``).
"""

from __future__ import annotations

import torch
from torch import nn

from muse.gen.config import GenModelConfig

TIMESTEP_SCALE = 1000.0


def build_sana(cfg: GenModelConfig):
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        num_layers=cfg.num_layers, num_cross_attention_heads=cfg.num_cross_attention_heads,
        cross_attention_head_dim=cfg.cross_attention_head_dim, cross_attention_dim=cfg.width,
        caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio, sample_size=cfg.latent_size,
        patch_size=cfg.patch_size, norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm,
        interpolation_scale=cfg.interpolation_scale)


class LatentGenerator(nn.Module):
    """v(x_t, t, condition): the velocity of eq. 6 on normalised latents.

    ``latent_mean`` / ``latent_std`` (per channel, buffers, so checkpoints carry them) map the
    tokenizer's latents to the unit-scale space the flow runs in: ``normalize`` before training,
    ``denormalize`` before the tokenizer's decoder."""

    def __init__(self, cfg: GenModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = build_sana(cfg)
        if cfg.condition == "class":
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.caption_channels)
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        else:
            self.null_caption = nn.Parameter(torch.zeros(1, 1, cfg.caption_channels))
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def set_latent_stats(self, mean, std) -> None:
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.latent_mean.shape or std.shape != self.latent_std.shape:
            raise ValueError(f"latent statistics have {tuple(mean.shape)} / {tuple(std.shape)} channels, the model "
                             f"model.latent_channels={self.cfg.latent_channels}")
        if not bool((std > 0).all()):
            raise ValueError(f"latent std must be > 0 in every channel, got {std.tolist()}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    def drop_condition(self, condition: dict, drop: torch.Tensor) -> dict:
        """``condition`` with the rows where ``drop`` (B,) is true replaced by the null condition."""
        if self.cfg.condition == "class":
            return {"labels": torch.where(drop, torch.full_like(condition["labels"], self.null_class),
                                          condition["labels"])}
        captions, mask = condition["captions"], condition.get("caption_mask")
        if captions.dim() == 2:  # one embedding per caption: a one-token sequence
            captions = captions[:, None, :]
        if mask is None:
            mask = torch.ones(captions.shape[:2], dtype=torch.long, device=captions.device)
        null = self.null_caption.to(captions.dtype).expand_as(captions)
        # A dropped row reads the null token alone: first position kept, the rest masked out.
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = 1
        return {"captions": torch.where(drop[:, None, None], null, captions),
                "caption_mask": torch.where(drop[:, None], null_mask, mask)}

    def _encoder_states(self, condition: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cfg.condition == "class":
            labels = condition["labels"]
            if labels.dtype != torch.long or labels.dim() != 1:
                raise ValueError(f"labels must be (batch,) int64 class ids, got {labels.dtype} {tuple(labels.shape)}")
            if bool(((labels < 0) | (labels > self.null_class)).any()):
                raise ValueError(f"class ids must be in [0, {self.cfg.num_classes}] ({self.cfg.num_classes}: the null "
                                 f"class), got {labels.min().item()}..{labels.max().item()}")
            return self.class_embedding(labels)[:, None, :], None
        captions = condition["captions"]
        if captions.dim() == 2:
            captions = captions[:, None, :]
        if captions.dim() != 3 or captions.shape[-1] != self.cfg.caption_channels:
            raise ValueError(f"captions must be (batch, tokens, {self.cfg.caption_channels}) embeddings, got "
                             f"{tuple(condition['captions'].shape)}")
        return captions, condition.get("caption_mask")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict) -> torch.Tensor:
        """x_t (B, C, h, w) normalised latents at flow time t (B,) in [0, 1] → the velocity (B, C, h, w)."""
        states, mask = self._encoder_states(condition)
        return self.transformer(hidden_states=x_t, encoder_hidden_states=states.to(x_t.dtype),
                                timestep=t * TIMESTEP_SCALE, encoder_attention_mask=mask, return_dict=False)[0]

    def guided_velocity(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: v_null + s·(v_cond − v_null), the two in one batch. s = 1 is the
        conditional model itself (one forward, no null pass)."""
        if cfg_scale == 1:
            return self(x_t, t, condition)
        batch = x_t.shape[0]
        null = self.drop_condition(condition, torch.ones(batch, dtype=torch.bool, device=x_t.device))
        if self.cfg.condition == "class":
            both = {"labels": torch.cat([condition["labels"], null["labels"]])}
        else:
            conditional = self.drop_condition(condition, torch.zeros(batch, dtype=torch.bool, device=x_t.device))
            both = {key: torch.cat([conditional[key], null[key]]) for key in ("captions", "caption_mask")}
        v_cond, v_null = self(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return v_null + cfg_scale * (v_cond - v_null)
