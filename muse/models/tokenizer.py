"""The MUSE tokenizer (SPEC §3): InternViT encoder → space-to-depth → adapter → Synergistic blocks →
latent head → DC-AE decoder, with a frozen DINOv3 teacher for the topology loss and an ITC head.

Fix of the official code: the teacher is fed correctly normalized pixels (the official code
normalized an already-normalized image a second time). Everything else — names, initialisation,
the raw decoder output, fp32 pretrained parts — is the official code's (SPEC §7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import ModelConfig
from muse.models.block import SynergisticBlock
from muse.models.inputs import check_images, check_model_config
from muse.models.pretrained import load_dcae_decoder, load_dinov3, load_internvit
from muse.models.structural_teacher import StructuralTeacher
from muse_kernels import capture_attention, resize_attention_4d
from muse_kernels.ops.resize_attention import RENORM_EPS, interpolation_matrix

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


def _random(part, section: str) -> None:
    """Random weights only where the config asks for them."""
    if not part.random_init:
        raise ValueError(f"{section}.pretrained is not set: point it at a local checkpoint folder, or set "
                         f"{section}.random_init=true to build the part with random weights")


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """InternViT in fp32 (frozen in stages 1–2, tuned in stage 3: bf16 weights would round its updates
    away; autocast does the bf16 work)."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    enc = cfg.encoder
    if enc.pretrained:
        return load_internvit(enc.pretrained)
    _random(enc, "model.encoder")
    config = InternVLVisionConfig(
        hidden_size=enc.hidden_size, num_hidden_layers=enc.num_layers, num_attention_heads=enc.num_heads,
        intermediate_size=enc.intermediate_size, patch_size=[enc.patch_size] * 2,
        image_size=[enc.image_size] * 2, attention_bias=True, use_mean_pooling=True,
    )
    return InternVLVisionModel(config).float()


def build_teacher(cfg: ModelConfig) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    t = cfg.teacher
    if t.kind == "structural":
        return StructuralTeacher(t.patch_size, t.colour_sigma, t.texture_sigma, t.distance_sigma)
    # Built on eager attention (output_attentions for teacher.attention=eager); teacher_maps switches it
    # to the muse kernels for its forward when teacher.attention=muse.
    if t.pretrained:
        model = load_dinov3(t.pretrained, attn_implementation="eager")
    else:
        _random(t, "model.teacher")
        config = DINOv3ViTConfig(
            hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            intermediate_size=t.intermediate_size, patch_size=t.patch_size, image_size=cfg.image_size,
            num_register_tokens=t.num_register_tokens, attn_implementation="eager",
        )
        model = DINOv3ViTModel(config)
    model.requires_grad_(False)
    return model.eval()


def build_autoencoder(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised DC-AE (``AutoencoderDC``) of the configured sizes."""
    from diffusers import AutoencoderDC

    d = cfg.decoder
    depth = len(d.block_out_channels)
    return AutoencoderDC(
        latent_channels=d.latent_channels, attention_head_dim=d.attention_head_dim,
        encoder_block_types=tuple(d.block_types), decoder_block_types=tuple(d.block_types),
        encoder_block_out_channels=tuple(d.block_out_channels),
        decoder_block_out_channels=tuple(d.block_out_channels),
        encoder_layers_per_block=tuple(d.layers_per_block), decoder_layers_per_block=tuple(d.layers_per_block),
        encoder_qkv_multiscales=tuple(tuple(m) for m in d.qkv_multiscales),
        decoder_qkv_multiscales=tuple(tuple(m) for m in d.qkv_multiscales),
        decoder_norm_types=("rms_norm",) * depth, decoder_act_fns=("silu",) * depth,
    )


def build_decoder(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The DC-AE decoder (the tokenizer's own encoder replaces DC-AE's) and its input channels."""
    if cfg.decoder.pretrained:
        return load_dcae_decoder(cfg.decoder.pretrained)
    _random(cfg.decoder, "model.decoder")
    return build_autoencoder(cfg).decoder, cfg.decoder.latent_channels


def official_init(module: nn.Module) -> None:
    """The official initialisation of the modules the tokenizer creates: truncated normal (std 0.02)
    linear weights, zero biases, norm weights 1."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


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
    hidden: torch.Tensor | None = None  # (B, h·w, dim): the last block's output x (the official seg probe's)


class MuseTokenizer(nn.Module):
    """The official ``MUSE_ViT`` with the official module and state-dict names (SPEC §7): ``encoder``,
    ``adapter_mlp``, ``muse_blocks``, ``to_latent``, ``semantic_projector``, ``logit_scale``,
    ``decoder_adapter`` (an Identity, so no keys, when the latent has the decoder's channels),
    ``decoder``, ``dino_teacher``, ``dino_mean``/``dino_std``. The encoder's names are transformers'
    ``InternVLVisionModel``'s; :meth:`load_official_checkpoint` and
    :func:`muse.models.official.to_official_state_dict` convert to and from the remote-code names.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        enc_dim = self.encoder.config.hidden_size
        self.patch_size = _first(self.encoder.config.patch_size)
        self.adapter_mlp = nn.Sequential(nn.RMSNorm(4 * enc_dim, eps=1e-6),
                                         nn.Linear(4 * enc_dim, cfg.dim, bias=False), nn.GELU())
        self.muse_blocks = nn.ModuleList(
            SynergisticBlock(cfg.dim, num_heads=cfg.num_heads, backend=cfg.backend) for _ in range(cfg.num_blocks)
        )
        self.grad_scaler = GradientScaler(cfg.grad_scale)
        self.to_latent = nn.Linear(cfg.dim, cfg.latent_channels)
        self.semantic_projector = nn.Sequential(nn.Linear(cfg.dim, cfg.dim, bias=False), nn.GELU(),
                                                nn.Linear(cfg.dim, cfg.text.embed_dim, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.decoder, decoder_channels = build_decoder(cfg)
        self.decoder_adapter = (nn.Conv2d(cfg.latent_channels, decoder_channels, 1)
                                if cfg.latent_channels != decoder_channels else nn.Identity())
        teacher = build_teacher(cfg)
        # The official name for DINOv3; the structural teacher has no weights and no official name.
        if isinstance(teacher, StructuralTeacher):
            self.structural_teacher, self.dino_teacher = teacher, None
        else:
            self.dino_teacher = teacher
        self.register_buffer("dino_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("dino_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        for part in (self.adapter_mlp, self.muse_blocks, self.to_latent, self.semantic_projector):
            part.apply(official_init)
        self.supervised = (set(range(cfg.num_blocks)) if cfg.supervise == "all" else {cfg.num_blocks - 1})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout or statistics updates, ever
        return self

    @property
    def teacher(self) -> nn.Module:
        return self.dino_teacher if self.dino_teacher is not None else self.structural_teacher

    @property
    def teacher_name(self) -> str:
        """What the topology loss aligns with, for logs and plots."""
        if self.dino_teacher is None:
            return self.structural_teacher.name
        return "DINOv3 teacher" + (" (random weights)" if self.cfg.teacher.random_init else "")

    def load_official_checkpoint(self, path, strict: bool = True) -> dict:
        """Loads an official MUSE checkpoint (a ``.safetensors``/``.bin``/``.pt`` state dict, or a
        folder holding ``model.safetensors`` or ``ema_model/pytorch_model.bin``) into this model,
        converting the encoder's remote-code names. See :func:`muse.models.official.load_official`."""
        from muse.models.official import load_official

        return load_official(self, path, strict=strict)

    def _check_images(self, images: torch.Tensor) -> None:
        minimum = 2 * self.patch_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (batch, 3, height, width) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]}")
        if images.shape[-2] < minimum or images.shape[-1] < minimum:
            raise ValueError(f"images must be at least {minimum}x{minimum} (two encoder patches of "
                             f"{self.patch_size} px each way), got {images.shape[-2]}x{images.shape[-1]}")
        if self.cfg.check_inputs:  # dtype and [-1, 1] range: one min/max per batch
            check_images(images)

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        hidden = self.encoder(pixel_values=normalize_images(images)).last_hidden_state[:, 1:]  # CLS dropped
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens, h, w = space_to_depth(hidden.float(), height, width)
        return self.adapter_mlp(tokens), h, w

    @torch.no_grad()
    def teacher_maps(self, images: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The teacher's last-layer attention, head-averaged, patch-to-patch, rows renormalized, Ψ-resized
        to ``grid_hw``. ``model.teacher_layout: official`` returns the official Ψ's transposed map."""
        patch = self.cfg.teacher.patch_size if self.dino_teacher is None else self.dino_teacher.config.patch_size
        # Normalized once (the official code normalizes an already-normalized image a second time);
        # padded to whole patches as official.
        pixels = ((images + 1) / 2 - self.dino_mean) / self.dino_std
        pad_h, pad_w = -pixels.shape[-2] % patch, -pixels.shape[-1] % patch
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        source_hw = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        spatial = source_hw[0] * source_hw[1]
        if self.dino_teacher is None:
            patches = self.structural_teacher((pixels * self.dino_std + self.dino_mean).clamp(0, 1))
        else:
            # The patch tokens are the last ones, after CLS and registers.
            patches = self._dino_head_mean(pixels)[:, -spatial:, -spatial:]
            patches = patches / (patches.sum(-1, keepdim=True) + RENORM_EPS)
        grid_hw = tuple(grid_hw)
        if source_hw == grid_hw:
            return patches
        if self.cfg.teacher_layout == "official":
            return official_resize(patches, source_hw, grid_hw)
        return resize_attention_4d(patches, grid_hw, source_hw=source_hw)

    def _dino_head_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """The teacher's last-layer attention averaged over heads, (B, T, T) in fp32, every token."""
        if self.cfg.teacher.attention == "eager":
            out = self.dino_teacher(pixel_values=pixels, output_attentions=True)
            return out.attentions[-1].float().mean(dim=1)
        with capture_attention(self.dino_teacher, layers=[-1], kind="head_mean") as maps:
            self.dino_teacher(pixel_values=pixels)
        return maps[-1].float()

    def _latents(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        latents = self.to_latent(self.grad_scaler(x))
        return latents.transpose(1, 2).reshape(x.shape[0], self.cfg.latent_channels, h, w)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], any size of at least two patches → latents (B, C, ⌊H/2p⌋, ⌊W/2p⌋)."""
        self._check_images(images)
        x, h, w = self._tokens(images)
        for block in self.muse_blocks:
            x = block(x).x
        return self._latents(x, h, w)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> MuseFeatures:
        """The features the probes read (linear, zero-shot, segmentation), from one encoder pass, at
        any input size (the official segmentation probe runs at 512²: 36×36 patches, 18×18 tokens)."""
        self._check_images(images)
        x, h, w = self._tokens(images)
        for block in self.muse_blocks:
            out = block(x)
            x = out.x
        latents = self.to_latent(x)
        image_embeds = F.normalize(self.semantic_projector(out.v_itc.mean(dim=1)), dim=-1)
        return MuseFeatures(latents=latents, semantic=out.v_itc, image_embeds=image_embeds, grid=(h, w), hidden=x)

    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Latents → the decoder's raw output (read as [-1, 1]; not clamped: losses, PNGs and metrics
        clamp where they make pixels), resized bilinearly to ``size`` — by default the input size the
        latent grid comes from (2·patch pixels per latent, 224² for an 8×8 grid)."""
        if latents.dim() != 4 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latents must be (batch, {self.cfg.latent_channels}, h, w), got {tuple(latents.shape)}")
        if size is None:
            size = (latents.shape[-2] * 2 * self.patch_size, latents.shape[-1] * 2 * self.patch_size)
        image = self.decoder(self.decoder_adapter(latents))
        if tuple(image.shape[-2:]) != tuple(size):
            image = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)
        return image

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor | None = None,
                return_maps: bool = False) -> MuseOutput:
        """images: (B, 3, H, W) in [-1, 1]; text_embeds: (B, text.embed_dim) for the ITC loss."""
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
        image_embeds = F.normalize(self.semantic_projector(v_itc.mean(dim=1)), dim=-1)
        latents = self._latents(x, h, w)
        loss_itc = None
        if text_embeds is not None:
            loss_itc = itc_loss(image_embeds, text_embeds, self.logit_scale)
        return MuseOutput(
            reconstruction=self.decode(latents, size=tuple(images.shape[-2:])), latents=latents,
            loss_topo=torch.stack(losses).mean() if losses else None,
            image_embeds=image_embeds, logit_scale=self.logit_scale, loss_itc=loss_itc,
            maps=maps if return_maps else None, teacher_maps=teacher if return_maps else None,
        )


def _first(size) -> int:
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def official_resize(patches: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """The official Ψ as it runs: the same two bilinear passes, but the result is never permuted back,
    so it is indexed (batch, key, query) and renormalized over queries — the transpose of the map."""
    resize = interpolation_matrix(source_hw, target_hw, patches.device, torch.promote_types(patches.dtype,
                                                                                            torch.float32))
    with torch.autocast(patches.device.type, enabled=False):
        resized = (resize @ patches.to(resize.dtype) @ resize.t()).transpose(1, 2)
        return resized / (resized.sum(dim=-1, keepdim=True) + RENORM_EPS)


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
