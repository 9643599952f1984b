"""The frozen text encoder behind the ITC loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import TextConfig


class ClipTextEncoder(nn.Module):
    """CLIP's text tower with its projection (``CLIPTextModelWithProjection``), frozen, returning
    L2-normalized (B, embed_dim) embeddings. Any module with this ``forward(input_ids,
    attention_mask=None)`` and an ``embed_dim`` attribute can stand in for it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        if cfg.pretrained:
            self.model = CLIPTextModelWithProjection.from_pretrained(cfg.pretrained)
        else:
            config = CLIPTextConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                    num_attention_heads=cfg.num_heads, intermediate_size=4 * cfg.hidden_size,
                                    projection_dim=cfg.embed_dim, vocab_size=cfg.vocab_size)
            self.model = CLIPTextModelWithProjection(config)
        self.embed_dim = self.model.config.projection_dim
        if self.embed_dim != cfg.embed_dim:
            raise ValueError(f"text.embed_dim is {cfg.embed_dim} but the loaded model projects to {self.embed_dim}")
        self.model.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        return F.normalize(embeds.float(), dim=-1)
