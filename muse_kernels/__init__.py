"""muse-kernels: fused kernels for MUSE Synergistic attention.

Attention that returns its probability maps at flash speed, with MUSE's gradient routing
(dV from the output, dQ/dK only from the maps' own loss).
"""

from muse_kernels.functional import synergistic_attention
from muse_kernels.modules import SynergisticAttention, apply_rotary

__all__ = ["SynergisticAttention", "apply_rotary", "synergistic_attention"]
__version__ = "0.1.0"
