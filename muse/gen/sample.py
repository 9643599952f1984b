"""Sampling the generator: integrate the flow from noise (t = 1) to data (t = 0), decode with the
tokenizer's decoder, write PNGs.

    muse-generate --generator runs/gen/sana_600m --classes 207 360 387 974 88 979 417 279 \\
        --per-class 4 --steps 50 --sampler euler --cfg-scale 4.0 --seed 0 --out samples/

The time grid is diffusers' ``FlowMatchEulerDiscreteScheduler``'s (``steps`` σ from 1 down to its
σ_min, then 0, shifted by ``shift``). ``euler``: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i), the scheduler's
step (checked against it in the tests). ``heun``: the same step as a predictor, corrected with the
mean of the velocities at both ends (2nd order; the last step, to σ = 0, stays Euler, as in EDM), so
``steps`` Heun steps cost 2·steps − 1 model evaluations. Sample i's noise comes from its own seed
(``seed + i``), so a sample does not depend on the batch it was drawn in. The tokenizer's decoder
output is raw (it is trained on clamped pixels): it is clamped to [-1, 1] to make pixels.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from muse.gen.config import GenConfig, gen_config_from_record

log = logging.getLogger("muse.gen")

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigma_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps`` + 1 flow times from 1 to 0: diffusers' FlowMatchEulerDiscreteScheduler's sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def _times(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.device).expand(x.shape[0])


@torch.no_grad()
def euler_sample(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    x = noise.float()
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        x = x + (next_sigma - sigma).to(x.device) * velocity(x, _times(sigma, x)).float()
    return x


@torch.no_grad()
def heun_sample(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    x = noise.float()
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        step = (next_sigma - sigma).to(x.device)
        v = velocity(x, _times(sigma, x)).float()
        predicted = x + step * v
        if next_sigma > 0:
            predicted = x + step * 0.5 * (v + velocity(predicted, _times(next_sigma, x)).float())
        x = predicted
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One (C, h, w) standard normal per seed, drawn on the CPU (the same on every device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_latents(model, labels: torch.Tensor, seeds: list[int], steps: int, sampler: str = "euler",
                   cfg_scale: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Class-conditional samples, denormalised into the tokenizer's latent space: (B, C, h, w)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} labels")
    device = model.latent_mean.device
    cfg = model.cfg
    noise = initial_noise(seeds, (cfg.latent_channels, cfg.latent_size, cfg.latent_size)).to(device)
    condition = {"labels": labels.to(device)}
    x = SAMPLERS[sampler](lambda x_t, t: model.guided_velocity(x_t, t, condition, cfg_scale), noise,
                          sigma_grid(steps, shift))
    return model.denormalize(x)


@torch.no_grad()
def decode(tokenizer, latents: torch.Tensor) -> torch.Tensor:
    """The tokenizer's decoder output clamped to [-1, 1] pixels."""
    return tokenizer.decode(latents.to(next(tokenizer.parameters()).device)).float().clamp(-1, 1)


def save_grid(images: torch.Tensor, columns: int, path: str | Path) -> Path:
    """[-1, 1] images in rows of ``columns`` (small tiles enlarged pixel for pixel)."""
    import numpy as np

    from muse.training.analysis import save_picture, to_uint8

    pixels = to_uint8(images)
    rows = -(-len(pixels) // columns)
    blank = np.zeros_like(pixels[0])
    tiles = list(pixels) + [blank] * (rows * columns - len(pixels))
    grid = np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1) for r in range(rows)])
    return save_picture(grid, pixels.shape[1], path)


def load_generator(path: str, weights: str = "ema", device: str | torch.device = "cpu"):
    """A generator checkpoint (file or run folder: its newest readable one) → (model with ``weights``
    "ema" or "model", the GenConfig it recorded)."""
    from muse.gen.model import LatentGenerator
    from muse.training.checkpoint import load_file_or_newest, load_model_weights

    file, state = load_file_or_newest(path, "--generator")
    if "config" not in state or weights not in state:
        raise ValueError(f"{file} is not a generator checkpoint of muse-train-gen (keys: {sorted(state)[:8]})")
    cfg = gen_config_from_record(state["config"])
    model = LatentGenerator(cfg.model)
    load_model_weights(model, state[weights], f"--generator {file}")
    return model.to(device).eval(), cfg


def load_decoder(cfg: GenConfig, args, device):
    """The tokenizer from the command line's --tokenizer-* options, else the one the generator's
    config names; its latent channels must be the generator's."""
    from muse.eval.common import load_tokenizer

    config = args.tokenizer_config or cfg.tokenizer.config
    if not config:
        raise ValueError("no tokenizer to decode with: the generator's config has no tokenizer.config; pass "
                         "--tokenizer-config (and --tokenizer-checkpoint or --tokenizer-official)")
    if args.tokenizer_config:
        checkpoint, official = args.tokenizer_checkpoint, args.tokenizer_official
    else:
        checkpoint = args.tokenizer_checkpoint or cfg.tokenizer.checkpoint
        official = args.tokenizer_official or (None if args.tokenizer_checkpoint else cfg.tokenizer.official)
    tokenizer, tokenizer_cfg = load_tokenizer(config, checkpoint, device=device, official=official)
    if tokenizer_cfg.model.latent_channels != cfg.model.latent_channels:
        raise ValueError(f"the tokenizer {config} has {tokenizer_cfg.model.latent_channels} latent channels, the "
                         f"generator {cfg.model.latent_channels}")
    return tokenizer


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="a muse-train-gen checkpoint file or run folder")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--tokenizer-config", help="default: the generator config's tokenizer.config")
    parser.add_argument("--tokenizer-checkpoint", help="a tokenizer checkpoint of ours (file or run folder)")
    parser.add_argument("--tokenizer-official", help="an official MUSE checkpoint")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="default: the generator config's sample.sampler")
    parser.add_argument("--steps", type=int, help="default: sample.steps")
    parser.add_argument("--cfg-scale", type=float, help="default: sample.cfg_scale (1: no guidance)")
    parser.add_argument("--shift", type=float, help="default: sample.shift")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def sampling_settings(cfg: GenConfig, args) -> dict:
    sc = cfg.sample
    return {"sampler": args.sampler or sc.sampler, "steps": args.steps or sc.steps,
            "cfg_scale": sc.cfg_scale if args.cfg_scale is None else args.cfg_scale,
            "shift": args.shift or sc.shift}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Sample the generator: class ids → PNG grid and per-image files")
    add_sampling_arguments(parser)
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="class ids (one grid row each)")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, cfg = load_generator(args.generator, args.weights, args.device)
        bad = [c for c in args.classes if not 0 <= c < cfg.model.num_classes]
        if bad:
            raise ValueError(f"--classes {bad}: the generator has classes 0..{cfg.model.num_classes - 1}")
        if args.per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
        tokenizer = load_decoder(cfg, args, args.device)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    settings = sampling_settings(cfg, args)
    labels = torch.tensor([c for c in args.classes for _ in range(args.per_class)])
    seeds = list(range(args.seed, args.seed + len(labels)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, len(labels), args.batch_size):
        latents = sample_latents(model, labels[start:start + args.batch_size], seeds[start:start + args.batch_size],
                                 **settings)
        images.append(decode(tokenizer, latents).cpu())
    images = torch.cat(images)
    from PIL import Image

    from muse.training.analysis import to_uint8

    for image, label, seed in zip(to_uint8(images), labels.tolist(), seeds):
        Image.fromarray(image).save(out / f"class{label:04d}_seed{seed}.png")
    grid = save_grid(images, args.per_class, out / "grid.png")
    log.info("%d samples (%s, %d steps, CFG %.2f) → %s and %s/class*_seed*.png", len(labels), settings["sampler"],
             settings["steps"], settings["cfg_scale"], grid, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
