"""MUSE tokenizer components."""

from muse.models.block import BlockOutput, SwiGLU, SynergisticBlock

__all__ = ["BlockOutput", "SwiGLU", "SynergisticBlock"]
