"""Model level: one Synergistic block, the 6-block connector, and a full tokenizer training step.

Providers: ``eager`` (the official code's way: the torch backend, maps materialized, topology KL on
the maps), ``ours`` (Triton kernels on CUDA, the torch backend elsewhere, with the fused topology
loss: no N×N map for the loss) and ``cuda`` (the CUDA C++ backend, fused loss too). Both compute the same losses: block and connector run
forward+backward with the topology loss on the last block, ITC on its semantic export against random
text embeddings, and a stand-in for the reconstruction path; the training step is the stage-2 step
(reconstruction, topology, ITC; no perceptual backbone) with its AdamW update. ``img_per_s`` is
recorded beside the time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_synergistic_attention import cuda_backend
from benchmarks.common import Case, SkipCase
from muse.models import SynergisticBlock
from muse.models.tokenizer import itc_loss, topology_kl_from_maps
from muse_kernels.ops.synergistic_attention_cuda import CUDA_HEAD_DIMS

OP = "model"
VARIANTS = ("block", "connector", "train_step")
PROVIDERS = ("eager", "ours", "cuda")
MODES = ("fwd+bwd",)
TEXT_DIM = 768


def shape_set(name: str) -> dict[str, list[dict]]:
    """Per variant: the connector's (B, N, C, H) at 224² and 448² inputs; training steps by config."""
    if name == "smoke":
        tokens = [dict(B=2, N=16, C=32, H=2)]
        return {"block": tokens, "connector": tokens, "train_step": [dict(config="tiny", B=2)]}
    tokens = [dict(B=32, N=n, C=512, H=8) for n in (64, 256)]
    if name == "sweep":
        tokens = [dict(B=8, N=n, C=512, H=8) for n in (64, 256, 1024, 4096)]
    return {"block": tokens, "connector": tokens,
            "train_step": [dict(config="tiny", B=32), dict(config="muse_1b/stage2", B=32)]}


def _backend(provider: str, device: torch.device) -> tuple[str, bool]:
    """(kernel backend, fused topology loss) of a provider."""
    if provider == "eager":
        return "torch", False
    if provider == "ours":
        return ("triton" if device.type == "cuda" else "torch"), True
    if provider == "cuda":
        return cuda_backend(device), True
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Connector(nn.Module):
    """Synergistic blocks as the tokenizer stacks them, the last one supervised, with the ITC head."""

    def __init__(self, dim: int, heads: int, blocks: int, backend: str, fused: bool):
        super().__init__()
        self.blocks = nn.ModuleList(SynergisticBlock(dim, num_heads=heads, backend=backend) for _ in range(blocks))
        self.itc_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, TEXT_DIM, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.fused = fused

    def forward(self, x, teacher, text_embeds):
        for block in self.blocks[:-1]:
            x = block(x).x
        if self.fused:
            # As the tokenizer does: its teacher is renormalized by construction, and the check syncs.
            out = self.blocks[-1](x, teacher=teacher, kl_reduction="head_mean", validate_teacher=False)
            topo = out.loss_topo
        else:
            out = self.blocks[-1](x, return_attn="head_mean")
            topo = topology_kl_from_maps(out.attn, teacher, "head_mean")
        embeds = F.normalize(self.itc_proj(out.v_itc.mean(dim=1)), dim=-1)
        return out.x.float().square().mean() + topo + itc_loss(embeds, text_embeds, self.logit_scale)


def connector_step(provider: str, blocks: int, shape: dict, dtype: torch.dtype, device: torch.device):
    backend, fused = _backend(provider, device)
    bsz, seq, dim = shape["B"], shape["N"], shape["C"]
    model = Connector(dim, shape["H"], blocks, backend, fused).to(device)
    x = torch.randn(bsz, seq, dim, device=device, requires_grad=True)
    teacher = torch.softmax(torch.randn(bsz, seq, seq, device=device), dim=-1)
    text = F.normalize(torch.randn(bsz, TEXT_DIM, device=device), dim=-1)

    def step():
        with _autocast(device, dtype):
            loss = model(x, teacher, text)
        loss.backward()
        return loss

    return step


def train_step(provider: str, shape: dict, dtype: torch.dtype, device: torch.device):
    from muse.config import load_config
    from muse.losses import MuseLoss
    from muse.models import MuseTokenizer
    from muse.training.optim import build_optimizer
    from muse.training.stages import configure_stage

    backend, fused = _backend(provider, device)
    # Random initialisation at the real component sizes: nothing is loaded.
    random = [f"model.{part}.random_init=true" for part in ("encoder", "teacher", "decoder", "text")]
    cfg = load_config(shape["config"], [f"model.backend={backend}", f"model.fused_topology={fused}", *random])
    head_dim = cfg.model.dim // cfg.model.num_heads
    if backend == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        raise SkipCase(f"the CUDA C++ backend takes head dims {CUDA_HEAD_DIMS}; {shape['config']} has {head_dim}")
    cfg.loss.perceptual, cfg.loss.itc = 0.0, cfg.loss.itc or 0.2
    try:
        model = MuseTokenizer(cfg.model).to(device)
    except torch.OutOfMemoryError:
        raise SkipCase("the model does not fit on this device") from None
    configure_stage(model, 2)
    loss_fn = MuseLoss(cfg.loss, [], None, cfg.loss.reconstruction_kind).to(device)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, 1.0)
    size = cfg.model.image_size
    images = torch.rand(shape["B"], 3, size, size, device=device) * 2 - 1
    text = F.normalize(torch.randn(shape["B"], cfg.model.text.embed_dim, device=device), dim=-1)

    def step():
        with _autocast(device, dtype):
            out = model(images, text_embeds=text)
            loss, _ = loss_fn(out, images, text, adversarial=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def cases(shapes: dict[str, list[dict]], dtype: torch.dtype, device: torch.device, providers, modes,
          variants) -> list[Case]:
    def make(provider, variant, shape):
        if variant == "train_step":
            return lambda: train_step(provider, shape, dtype, device)
        return lambda: connector_step(provider, 1 if variant == "block" else 6, shape, dtype, device)

    return [Case(OP, provider, variant, "fwd+bwd", dict(shape), str(dtype).removeprefix("torch."),
                 make(provider, variant, shape), images=shape["B"])
            for variant in variants for shape in shapes[variant] for provider in providers if "fwd+bwd" in modes]
