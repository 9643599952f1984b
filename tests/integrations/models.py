"""Tiny random transformers models of the families the project meets, built from their configs, and
a runner that compares one model under two attention implementations."""

from __future__ import annotations

import copy

import torch


def vit(hidden=64, heads=4):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=96,
                       image_size=32, patch_size=8)
    return ViTModel(config, add_pooling_layer=False)


def dinov3(attention_dropout=0.0):
    """With register tokens: CLS, 4 registers and 16 patches."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                             patch_size=8, image_size=32, num_register_tokens=4,
                             attention_dropout=attention_dropout)
    return DINOv3ViTModel(config)


def internvl_vision():
    """The InternViT tower as MUSE builds it (attention biases, mean pooling), with QK norm."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    config = InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                  patch_size=[8, 8], image_size=[32, 32], attention_bias=True,
                                  use_mean_pooling=True, use_qk_norm=True)
    return InternVLVisionModel(config)


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96, max_position_embeddings=16)
    return CLIPTextModel(config)


def qwen2():
    """Grouped-query attention (4 query heads, 2 kv heads) and a causal mask."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    return Qwen2Model(config)


def pixels(bsz=2, seed=0):
    return torch.randn(bsz, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text_batch(seq=11, seed=0):
    """Token ids with a padding mask: row 0 full, row 1 right-padded, row 2 left-padded (its padded
    query positions see no key at all under the causal mask: fully masked rows)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (3, seq), generator=gen)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, -4:] = 0
    mask[2, :3] = 0
    return ids, mask


def twin(model, implementation: str, dtype=torch.float32):
    """A copy of ``model`` in ``dtype`` running ``implementation``, in eval mode."""
    other = copy.deepcopy(model).to(dtype).eval()
    other.set_attn_implementation(implementation)
    return other
