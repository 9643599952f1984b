"""The official MUSE checkpoint layout and forward, written from SPEC §2, §3 and §7 and the official
``muse_vit.py`` — independently of ``muse.models`` — so that tests load files laid out as the
official code writes them and compare with what the official code computes.

Third-party parts keep their owners' names: the decoder's keys are diffusers' ``AutoencoderDC``
decoder's, the teacher's what transformers writes for ``DINOv3ViTModel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def internvit_remote_shapes(hidden: int, layers: int, intermediate: int, patch: int, native: int) -> dict:
    """Remote-code InternViT (qkv_bias, no qk norm, LayerNorm), as under ``vision_model.`` of InternVL3."""
    shapes = {
        "embeddings.class_embedding": (1, 1, hidden),
        "embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        "embeddings.patch_embedding.bias": (hidden,),
        "embeddings.position_embedding": (1, (native // patch) ** 2 + 1, hidden),
    }
    for n in range(layers):
        p = f"encoder.layers.{n}."
        shapes |= {p + "attn.qkv.weight": (3 * hidden, hidden), p + "attn.qkv.bias": (3 * hidden,),
                   p + "attn.proj.weight": (hidden, hidden), p + "attn.proj.bias": (hidden,),
                   p + "norm1.weight": (hidden,), p + "norm1.bias": (hidden,),
                   p + "norm2.weight": (hidden,), p + "norm2.bias": (hidden,),
                   p + "ls1": (hidden,), p + "ls2": (hidden,),
                   p + "mlp.fc1.weight": (intermediate, hidden), p + "mlp.fc1.bias": (intermediate,),
                   p + "mlp.fc2.weight": (hidden, intermediate), p + "mlp.fc2.bias": (hidden,)}
    return shapes


def muse_shapes(enc_hidden: int, dim: int, blocks: int, heads: int, latent: int, text_dim: int,
                itc: bool = True) -> dict:
    """adapter_mlp, muse_blocks, to_latent, semantic_projector, logit_scale, dino_mean/std (SPEC §7)."""
    head_dim, hidden = dim // heads, int(2 * 4 * dim / 3)
    shapes = {"adapter_mlp.0.weight": (4 * enc_hidden,), "adapter_mlp.1.weight": (dim, 4 * enc_hidden),
              "to_latent.weight": (latent, dim), "to_latent.bias": (latent,),
              "dino_mean": (1, 3, 1, 1), "dino_std": (1, 3, 1, 1)}
    for i in range(blocks):
        p = f"muse_blocks.{i}."
        shapes |= {p + name + ".weight": (dim, dim) for name in ("q_topo", "k_topo", "v_sem", "v_itc", "proj")}
        shapes |= {p + "q_norm.weight": (head_dim,), p + "k_norm.weight": (head_dim,),
                   p + "norm1.weight": (dim,), p + "norm2.weight": (dim,),
                   p + "mlp.w1.weight": (hidden, dim), p + "mlp.w2.weight": (hidden, dim),
                   p + "mlp.w3.weight": (dim, hidden)}
    if itc:
        shapes |= {"semantic_projector.0.weight": (dim, dim), "semantic_projector.2.weight": (text_dim, dim),
                   "logit_scale": ()}
    return shapes


def random_state(shapes: dict, seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Values for a layout: norms and layer scales near 1 / 0.1 as trained ones are, the rest small."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen) * scale
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "adapter_mlp.0.weight")):
            value = 1 + value
        state[key] = value
    state["dino_mean"], state["dino_std"] = MEAN.clone(), STD.clone()
    if "logit_scale" in state:
        state["logit_scale"] = torch.tensor(2.6592)
    return state


# --- The official forward, functionally ----------------------------------------------------------------

def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + eps) * weight


def internvit_forward(enc: dict, pixels: torch.Tensor, heads: int, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Remote-code InternViT on ImageNet-normalized pixels: every token of the last layer (CLS first)."""
    x = F.conv2d(pixels, enc["embeddings.patch_embedding.weight"], enc["embeddings.patch_embedding.bias"],
                 stride=patch)
    height, width = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    hidden = x.shape[-1]
    x = torch.cat([enc["embeddings.class_embedding"].expand(x.shape[0], -1, -1), x], dim=1)
    pos = enc["embeddings.position_embedding"]
    side = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, side, side, hidden).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], grid.reshape(1, hidden, -1).permute(0, 2, 1)], dim=1)
    layers = 1 + max(int(k.split(".")[2]) for k in enc if k.startswith("encoder.layers."))
    for n in range(layers):
        p = f"encoder.layers.{n}."
        h = F.layer_norm(x, (hidden,), enc[p + "norm1.weight"], enc[p + "norm1.bias"], eps)
        qkv = F.linear(h, enc[p + "attn.qkv.weight"], enc[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(x.shape[0], x.shape[1], 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (hidden // heads) ** -0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(out, enc[p + "attn.proj.weight"], enc[p + "attn.proj.bias"]) * enc[p + "ls1"]
        h = F.layer_norm(x, (hidden,), enc[p + "norm2.weight"], enc[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, enc[p + "mlp.fc1.weight"], enc[p + "mlp.fc1.bias"])),
                     enc[p + "mlp.fc2.weight"], enc[p + "mlp.fc2.bias"])
        x = x + h * enc[p + "ls2"]
    return x


def rotary(t: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """The official RoPE on (B, H, N, d): tables for 4096 positions, rotate-half."""
    dim = t.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(4096, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[: t.shape[2]]
    x1, x2 = t[..., : dim // 2], t[..., dim // 2:]
    return t * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def block_forward(state: dict, prefix: str, x: torch.Tensor, heads: int):
    """The official SynergisticBlock: (x, attn_map, v_itc)."""
    bsz, seq, dim = x.shape
    head_dim = dim // heads
    w = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    h = rms(x, w["norm1.weight"])
    q = rms(F.linear(h, w["q_topo.weight"]).reshape(bsz, seq, heads, head_dim), w["q_norm.weight"]).transpose(1, 2)
    k = rms(F.linear(h, w["k_topo.weight"]).reshape(bsz, seq, heads, head_dim), w["k_norm.weight"]).transpose(1, 2)
    v = F.linear(h, w["v_sem.weight"]).reshape(bsz, seq, heads, head_dim).transpose(1, 2)
    attn = torch.softmax(rotary(q) @ rotary(k).transpose(-2, -1) * head_dim ** -0.5, dim=-1)
    out = F.linear((attn @ v).transpose(1, 2).reshape(bsz, seq, dim), w["proj.weight"])
    y = x + out
    h2 = rms(y, w["norm2.weight"])
    y = y + F.linear(F.silu(F.linear(h2, w["mlp.w1.weight"])) * F.linear(h2, w["mlp.w2.weight"]), w["mlp.w3.weight"])
    return y, attn, F.linear(x, w["v_itc.weight"])


def pixel_unshuffle(tokens: torch.Tensor) -> torch.Tensor:
    """The official space-to-depth on a square grid (an odd side cropped)."""
    bsz, n, c = tokens.shape
    side = math.isqrt(n)
    x = tokens.view(bsz, side, side, c)
    if side % 2:
        x, side = x[:, : side - 1, : side - 1], side - 1
    x = x.reshape(bsz, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(bsz, -1, 4 * c)


def muse_encode(state: dict, images: torch.Tensor, enc_heads: int, patch: int, heads: int):
    """Official ``MUSE_ViT.encode`` on [-1, 1] images (it takes them ImageNet-normalized): the latent
    map, the last block's maps and its v_itc."""
    pixels = ((images + 1) / 2 - MEAN) / STD
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    tokens = internvit_forward(enc, pixels, enc_heads, patch)[:, 1:].float()
    x = pixel_unshuffle(tokens)
    x = F.gelu(F.linear(rms(x, state["adapter_mlp.0.weight"]), state["adapter_mlp.1.weight"]))
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("muse_blocks."))
    for i in range(blocks):
        x, attn, v_itc = block_forward(state, f"muse_blocks.{i}.", x, heads)
    z = F.linear(x, state["to_latent.weight"], state["to_latent.bias"]).permute(0, 2, 1)
    side = math.isqrt(z.shape[-1])
    return z.reshape(z.shape[0], z.shape[1], side, side), attn, v_itc


def image_embeds(state: dict, v_itc: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.linear(v_itc.mean(dim=1), state["semantic_projector.0.weight"]))
    return F.normalize(F.linear(h, state["semantic_projector.2.weight"]), dim=-1)


def official_resize(attn: torch.Tensor, target: int) -> torch.Tensor:
    """The official ``resize_attention_map_4d`` as it runs (no permute back after the second pass)."""
    bsz, n_src, _ = attn.shape
    side = math.isqrt(n_src)
    keys = F.interpolate(attn.reshape(bsz * n_src, 1, side, side), size=(target, target), mode="bilinear",
                         align_corners=False).reshape(bsz, side, side, target, target)
    queries = keys.permute(0, 3, 4, 1, 2).reshape(bsz * target * target, 1, side, side)
    out = F.interpolate(queries, size=(target, target), mode="bilinear", align_corners=False)
    out = out.reshape(bsz, target * target, target * target)
    return out / (out.sum(dim=-1, keepdim=True) + 1e-6)
