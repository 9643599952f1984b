"""The MUSE tokenizer (SPEC §3): InternViT encoder → space-to-depth → adapter → Synergistic blocks →
latent head → DC-AE decoder, with a frozen DINOv3 teacher for the topology loss and an ITC head.

Fix of the official code: the teacher is fed correctly normalized pixels (the official code
normalized an already-normalized image a second time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import ModelConfig
from muse.models.block import SynergisticBlock
from muse_kernels import resize_attention_4d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class GradientScaler(nn.Module):
    """Identity forward; the gradient is multiplied by ``scale`` (0.5 in stages 1–2, 1.0 in stage 3)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scale == 1.0 else _ScaleGradient.apply(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def space_to_depth(tokens: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
    """(B, h·w, C) → (B, ⌊h/2⌋·⌊w/2⌋, 4C), each 2×2 patch neighbourhood stacked in (row, col) order;
    an odd last row or column is cropped."""
    bsz, _, channels = tokens.shape
    grid = tokens.view(bsz, height, width, channels)[:, : height // 2 * 2, : width // 2 * 2]
    h2, w2 = height // 2, width // 2
    grid = grid.reshape(bsz, h2, 2, w2, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(bsz, h2 * w2, 4 * channels), h2, w2


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels → ImageNet-normalized, what both InternViT and DINOv3 were trained on."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def build_encoder(cfg: ModelConfig) -> nn.Module:
    from transformers import InternVLVisionConfig, InternVLVisionModel

    enc = cfg.encoder
    if enc.pretrained:
        return InternVLVisionModel.from_pretrained(enc.pretrained)
    config = InternVLVisionConfig(
        hidden_size=enc.hidden_size, num_hidden_layers=enc.num_layers, num_attention_heads=enc.num_heads,
        intermediate_size=enc.intermediate_size, patch_size=[enc.patch_size] * 2,
        image_size=[cfg.image_size] * 2, use_mean_pooling=False,
    )
    return InternVLVisionModel(config)


def build_teacher(cfg: ModelConfig) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    t = cfg.teacher
    # Eager attention: the SDPA and flash paths do not return the maps the loss needs.
    if t.pretrained:
        model = DINOv3ViTModel.from_pretrained(t.pretrained, attn_implementation="eager")
    else:
        config = DINOv3ViTConfig(
            hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            intermediate_size=t.intermediate_size, patch_size=t.patch_size, image_size=cfg.image_size,
            num_register_tokens=t.num_register_tokens, attn_implementation="eager",
        )
        model = DINOv3ViTModel(config)
    model.requires_grad_(False)
    return model.eval()


def build_autoencoder(cfg: ModelConfig) -> nn.Module:
    """The whole DC-AE (``AutoencoderDC``), pretrained from a local folder or random from the sizes."""
    from diffusers import AutoencoderDC

    d = cfg.decoder
    if d.pretrained:
        autoencoder = AutoencoderDC.from_pretrained(d.pretrained)
    else:
        depth = len(d.block_out_channels)
        autoencoder = AutoencoderDC(
            latent_channels=cfg.latent_channels, attention_head_dim=d.attention_head_dim,
            encoder_block_types=tuple(d.block_types), decoder_block_types=tuple(d.block_types),
            encoder_block_out_channels=tuple(d.block_out_channels),
            decoder_block_out_channels=tuple(d.block_out_channels),
            encoder_layers_per_block=tuple(d.layers_per_block), decoder_layers_per_block=tuple(d.layers_per_block),
            encoder_qkv_multiscales=tuple(tuple(m) for m in d.qkv_multiscales),
            decoder_qkv_multiscales=tuple(tuple(m) for m in d.qkv_multiscales),
            decoder_norm_types=("rms_norm",) * depth, decoder_act_fns=("silu",) * depth,
        )
    return autoencoder


def build_decoder(cfg: ModelConfig) -> nn.Module:
    # The tokenizer's own encoder replaces DC-AE's: only the decoder is kept.
    return build_autoencoder(cfg).decoder


@dataclass
class MuseOutput:
    reconstruction: torch.Tensor
    latents: torch.Tensor
    loss_topo: torch.Tensor | None
    image_embeds: torch.Tensor
    logit_scale: torch.Tensor
    loss_itc: torch.Tensor | None = None
    maps: list[torch.Tensor] | None = None
    teacher_maps: torch.Tensor | None = None


@dataclass
class MuseFeatures:
    """Frozen-model features for probes: per token on the (h, w) latent grid, and per image."""

    latents: torch.Tensor  # (B, h·w, latent_channels): what the decoder reads
    semantic: torch.Tensor  # (B, h·w, dim): the last block's semantic export v_itc
    image_embeds: torch.Tensor  # (B, text.embed_dim), L2-normalized: the ITC embedding
    grid: tuple[int, int]


class MuseTokenizer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        enc_dim = self.encoder.config.hidden_size
        self.adapter = nn.Sequential(nn.RMSNorm(4 * enc_dim, eps=1e-6), nn.Linear(4 * enc_dim, cfg.dim, bias=False),
                                     nn.GELU())
        self.muse_blocks = nn.ModuleList(
            SynergisticBlock(cfg.dim, num_heads=cfg.num_heads, backend=cfg.backend) for _ in range(cfg.num_blocks)
        )
        self.grad_scaler = GradientScaler(cfg.grad_scale)
        self.to_latent = nn.Linear(cfg.dim, cfg.latent_channels)
        self.decoder_adapter = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.decoder_adapter else None)
        self.decoder = build_decoder(cfg)
        self.itc_proj = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(),
                                      nn.Linear(cfg.dim, cfg.text.embed_dim, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.teacher = build_teacher(cfg)
        self.supervised = (set(range(cfg.num_blocks)) if cfg.supervise == "all" else {cfg.num_blocks - 1})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout or statistics updates, ever
        return self

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.cfg.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (batch, 3, {size}, {size}) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images must be {size}x{size} (model.image_size), got "
                             f"{images.shape[-2]}x{images.shape[-1]}")

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        hidden = self.encoder(pixel_values=normalize_images(images)).last_hidden_state[:, 1:]  # CLS dropped
        side = self.cfg.image_size // self.cfg.encoder.patch_size
        tokens, h, w = space_to_depth(hidden, side, side)
        return self.adapter(tokens), h, w

    @torch.no_grad()
    def teacher_maps(self, images: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The teacher's last-layer attention, head-averaged, patch-to-patch, rows renormalized, Ψ-resized."""
        out = self.teacher(pixel_values=normalize_images(images), output_attentions=True)
        attn = out.attentions[-1].float().mean(dim=1)
        skip = 1 + self.teacher.config.num_register_tokens  # CLS and register tokens
        patches = attn[:, skip:, skip:]
        patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
        return resize_attention_4d(patches, grid_hw)

    def _latents(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        latents = self.to_latent(self.grad_scaler(x))
        return latents.transpose(1, 2).reshape(x.shape[0], self.cfg.latent_channels, h, w)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        x, h, w = self._tokens(images)
        for block in self.muse_blocks:
            x = block(x).x
        return self._latents(x, h, w)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> MuseFeatures:
        """The features the probes read (linear, zero-shot, segmentation), from one encoder pass."""
        self._check_images(images)
        x, h, w = self._tokens(images)
        for block in self.muse_blocks:
            out = block(x)
            x = out.x
        latents = self.to_latent(x)
        image_embeds = F.normalize(self.itc_proj(out.v_itc.mean(dim=1)), dim=-1)
        return MuseFeatures(latents=latents, semantic=out.v_itc, image_embeds=image_embeds, grid=(h, w))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latents must be (batch, {self.cfg.latent_channels}, h, w), got {tuple(latents.shape)}")
        if self.decoder_adapter is not None:
            latents = self.decoder_adapter(latents)
        image = self.decoder(latents)
        size = self.cfg.image_size
        if image.shape[-1] != size or image.shape[-2] != size:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        return torch.tanh(image)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor | None = None,
                return_maps: bool = False) -> MuseOutput:
        """images: (B, 3, S, S) in [-1, 1]; text_embeds: (B, text.embed_dim) for the ITC loss."""
        self._check_images(images)
        if text_embeds is not None and tuple(text_embeds.shape) != (images.shape[0], self.cfg.text.embed_dim):
            raise ValueError(f"text_embeds must be (batch={images.shape[0]}, {self.cfg.text.embed_dim}), got "
                             f"{tuple(text_embeds.shape)}")
        x, h, w = self._tokens(images)
        teacher = self.teacher_maps(images, (h, w))
        reduction = self.cfg.topo_reduction
        map_kind = "head_mean" if reduction == "head_mean" else "per_head"
        losses, maps, v_itc = [], [], None
        for index, block in enumerate(self.muse_blocks):
            supervised = index in self.supervised
            if supervised and self.cfg.fused_topology and not return_maps:
                # The teacher's rows are renormalized above: checking them would only stall the
                # host on the GPU once per supervised block and step.
                out = block(x, teacher=teacher, kl_reduction=reduction, validate_teacher=False)
                losses.append(out.loss_topo)
            elif supervised or return_maps:
                out = block(x, return_attn=map_kind)
                maps.append(out.attn)
                if supervised:
                    losses.append(topology_kl_from_maps(out.attn, teacher, reduction))
            else:
                out = block(x)
            x, v_itc = out.x, out.v_itc
        image_embeds = F.normalize(self.itc_proj(v_itc.mean(dim=1)), dim=-1)
        latents = self._latents(x, h, w)
        loss_itc = None
        if text_embeds is not None:
            loss_itc = itc_loss(image_embeds, text_embeds, self.logit_scale)
        return MuseOutput(
            reconstruction=self.decode(latents), latents=latents,
            loss_topo=torch.stack(losses).mean() if losses else None,
            image_embeds=image_embeds, logit_scale=self.logit_scale, loss_itc=loss_itc,
            maps=maps if return_maps else None, teacher_maps=teacher if return_maps else None,
        )


def topology_kl_from_maps(maps: torch.Tensor, teacher: torch.Tensor, reduction: str, eps: float = 1e-8) -> torch.Tensor:
    """The KL on materialized maps (the official code's way), for comparison with the fused loss:
    head-mean maps (B, N, N) with ``log(s̄ + eps)``; per-head maps (B, H, N, N) with ``log A``."""
    t = teacher.float()
    if reduction == "head_mean":
        return (torch.xlogy(t, t) - t * torch.log(maps.float() + eps)).sum(-1).mean()
    t = t.unsqueeze(1)
    # xlogy(t, A) is 0 where t is 0, even where A has underflowed to 0.
    return (torch.xlogy(t, t) - torch.xlogy(t, maps.float())).sum(-1).mean()


def itc_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric image-text contrastive loss (CLIP); both sides L2-normalized, exp(logit_scale) temperature."""
    text = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.exp() * image_embeds.float() @ text.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
