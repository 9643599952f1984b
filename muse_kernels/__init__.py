"""muse-kernels: fused kernels for MUSE Synergistic attention.

Attention that returns its probability maps at flash speed, with MUSE's gradient routing
(dV from the output, dQ/dK only from the maps' own loss).
"""

from muse_kernels.capture import capture_attention
from muse_kernels.functional import synergistic_attention, topology_kl_loss
from muse_kernels.modules import SynergisticAttention, apply_rotary
from muse_kernels.ops.resize_attention import resize_attention_4d

__all__ = ["SynergisticAttention", "apply_rotary", "capture_attention", "resize_attention_4d", "synergistic_attention",
           "topology_kl_loss"]
__version__ = "0.1.0"
