"""MUSE tokenizer components."""

from muse.models.block import BlockOutput, SwiGLU, SynergisticBlock

__all__ = ["BlockOutput", "SwiGLU", "SynergisticBlock"]
from muse.models.tokenizer import (GradientScaler, MuseFeatures, MuseOutput, MuseTokenizer, itc_loss,
                                   space_to_depth)

__all__ += ["GradientScaler", "MuseFeatures", "MuseOutput", "MuseTokenizer", "itc_loss", "space_to_depth"]
from muse.models.text import ClipTextEncoder, HashTokenizer, build_tokenizer

__all__ += ["ClipTextEncoder", "HashTokenizer", "build_tokenizer"]
