"""The frozen text encoder behind the ITC loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import TextConfig
from muse.models.pretrained import load_clip_text


class ClipTextEncoder(nn.Module):
    """CLIP's text tower with its projection (``CLIPTextModelWithProjection``), frozen, returning
    L2-normalized (B, embed_dim) embeddings. Any module with this ``forward(input_ids,
    attention_mask=None)`` and an ``embed_dim`` attribute can stand in for it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        if cfg.pretrained:
            self.model = load_clip_text(cfg.pretrained)
        else:
            if not cfg.random_init:
                raise ValueError("model.text.pretrained is not set: point it at a local CLIP folder (text tower "
                                 "and tokenizer), or set model.text.random_init=true for a random text encoder")
            # Special ids follow HashTokenizer (0 padding, 1 end of text): the pooled embedding is
            # read at the end-of-text token.
            config = CLIPTextConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                    num_attention_heads=cfg.num_heads, intermediate_size=4 * cfg.hidden_size,
                                    projection_dim=cfg.embed_dim, vocab_size=cfg.vocab_size,
                                    max_position_embeddings=cfg.max_length, pad_token_id=0, bos_token_id=0,
                                    eos_token_id=1)
            # Seeded apart from the global generator: the same weights in every run and process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.model = CLIPTextModelWithProjection(config)
        self.random_init = not cfg.pretrained
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


class HashTokenizer:
    """Lower-cased words hashed into the vocabulary: a stand-in for CLIP's BPE tokenizer when the text
    encoder is randomly initialised (tiny configs, tests), where no vocabulary exists to load."""

    def __init__(self, vocab_size: int, max_length: int = 77):
        self.vocab_size, self.max_length = vocab_size, max_length

    def _id(self, word: str) -> int:
        import zlib

        return 2 + zlib.crc32(word.encode()) % (self.vocab_size - 2)  # 0: padding, 1: end of text

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            tokens = [self._id(w) for w in text.lower().split()][: self.max_length - 1] + [1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def build_tokenizer(cfg: TextConfig):
    """CLIP's tokenizer (77 tokens) from ``text.tokenizer``, by default the ``text.pretrained`` folder;
    the hashing stand-in only for a randomly initialised encoder, which has no vocabulary. Both map a
    list of captions to ``{"input_ids", "attention_mask"}`` tensors."""
    folder = cfg.tokenizer or cfg.pretrained
    if folder:
        from transformers import CLIPTokenizer

        files = Path(folder)
        # Without its files, from_pretrained builds a tokenizer with no vocabulary and no error.
        if not ((files / "tokenizer.json").is_file() or
                ((files / "vocab.json").is_file() and (files / "merges.txt").is_file())):
            raise ValueError(f"model.text: no CLIP tokenizer in {folder} (tokenizer.json, or vocab.json and "
                             f"merges.txt); set model.text.tokenizer to a folder that has one")
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        return lambda texts: dict(tokenizer(texts, padding="max_length", truncation=True,
                                            max_length=cfg.max_length, return_tensors="pt"))
    if not cfg.random_init:
        raise ValueError("model.text: neither a CLIP tokenizer (model.text.tokenizer / model.text.pretrained) nor "
                         "model.text.random_init=true; the hashing stand-in is only for random text encoders")
    return HashTokenizer(cfg.vocab_size, cfg.max_length)
