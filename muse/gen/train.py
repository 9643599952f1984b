"""Train the latent generator by flow matching, on the tokenizer's training machinery.

    muse-train-gen --config gen/tiny data.latents=demo_out/latents train.steps=200
    torchrun --nproc_per_node=8 -m muse.gen.train --config gen/sana_600m data.latents=latents/imagenet-train
    muse-train-gen --config gen/sana_600m --resume        # continue from train.out_dir's newest checkpoint

A batch of latents (normalised by the extraction's per-channel statistics, which the model keeps as
buffers) → eq. 6's loss under autocast → (skip on a non-finite loss) → clipped AdamW step → EMA → log
records, sample grids and atomic checkpoints. The loop is the tokenizer's (``muse.train``), from
``muse.training.loop``: run-folder claiming (``--resume`` / ``--overwrite``), DDP setup, autocast, the
finite-loss rule, log records and TensorBoard, checkpoints (atomic, newest readable on resume, config
recorded and checked); and ``muse.training``'s EMA, optimizer groups and schedule. Batches, timesteps,
noise and label dropout are functions of (seed, step, rank): an interrupted run resumes bit for bit.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from muse.gen.config import GenConfig, load_gen_config
from muse.gen.flow import flow_matching_loss
from muse.gen.latents import LatentDataset
from muse.gen.model import LatentGenerator
from muse.training.checkpoint import CheckpointError, ConfigMismatch
from muse.training.ema import EMA
from muse.training.loop import (Forward, RunFolderInUse, TrainingRun, claim_run_folder, data_parallel,
                                setup_distributed, trainer_arguments)
from muse.training.optim import build_optimizer, lr_at

log = logging.getLogger("muse.gen.train")


def batch_indices(step: int, size: int, batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s samples at ``step``: one pass after another through the data, each pass a
    permutation seeded by (seed, pass); the global batch is ``batch · world`` consecutive positions."""
    positions = step * batch * world + rank * batch + torch.arange(batch)
    passes = positions // size
    indices = torch.empty(batch, dtype=torch.long)
    for number in passes.unique().tolist():
        permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + number))
        chosen = passes == number
        indices[chosen] = permutation[positions[chosen] % size]
    return indices


def step_generator(seed: int, step: int, rank: int, world: int, device: torch.device) -> torch.Generator:
    """The generator of a step's timesteps, noise and label dropout on one rank."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * world + rank)


class GridSampler:
    """Sample grids of the EMA weights, decoded by the config's tokenizer (loaded on first use)."""

    def __init__(self, cfg: GenConfig, device: torch.device):
        self.cfg, self.device, self.tokenizer, self.model = cfg, device, None, None

    def __call__(self, model: LatentGenerator, ema: EMA, path: Path) -> Path:
        from muse.eval.common import load_tokenizer
        from muse.gen.sample import decode, sample_latents, save_grid

        tc, sc = self.cfg.tokenizer, self.cfg.sample
        if self.tokenizer is None:
            self.tokenizer, _ = load_tokenizer(tc.config, tc.checkpoint, device=self.device, official=tc.official)
            self.model = copy.deepcopy(model).eval()
        ema.copy_to(self.model)
        per_class = 4
        labels = torch.tensor([c for c in sc.classes for _ in range(per_class)])
        latents = sample_latents(self.model, labels, list(range(sc.seed, sc.seed + len(labels))), sc.steps,
                                 sc.sampler, sc.cfg_scale, sc.shift)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(decode(self.tokenizer, latents), per_class, path)


def _conditions(labels: torch.Tensor, model: LatentGenerator) -> dict:
    # Unlabelled latents (class -1) train the null class: the unconditional half of guidance.
    return {"labels": torch.where(labels < 0, torch.full_like(labels, model.null_class), labels)}


def train(cfg: GenConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``cfg``'s generator; ``resume`` / ``overwrite`` as ``muse.train.train``."""
    if cfg.model.condition != "class":
        raise ValueError("muse-train-gen trains class-conditional generators (model.condition=class); the text "
                         "path of LatentGenerator has no caption-embedding latent shards to read yet")
    rank, world, device = setup_distributed()
    main_process = rank == 0
    tc, oc = cfg.train, cfg.optim
    if not cfg.data.latents:
        raise ValueError("data.latents is empty: give the folder muse-encode-latents wrote")
    data = LatentDataset(cfg.data.latents)
    shape = [cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size]
    if data.stats["latent_shape"] != shape:
        raise ValueError(f"data.latents holds {data.stats['latent_shape']} latents, the model reads {shape} "
                         "(model.latent_channels, model.latent_size)")
    if int(data.cls.max()) >= cfg.model.num_classes:
        raise ValueError(f"data.latents has class ids up to {int(data.cls.max())}, model.num_classes is "
                         f"{cfg.model.num_classes}")
    out_dir = Path(tc.out_dir)
    claim_run_folder(out_dir, resume, overwrite, main_process, dist.barrier if world > 1 else lambda: None)
    torch.manual_seed(tc.seed)
    model = LatentGenerator(cfg.model)
    model.set_latent_stats(data.stats["mean"], data.stats["std"])
    model.to(device)
    optimizer = build_optimizer(model, oc.lr, oc.weight_decay, oc.betas, 1.0, oc.no_decay_keywords)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    run = TrainingRun(cfg, model, optimizer, ema, device, rank, world, log)
    if resume:
        run.resume()
    ddp_model = data_parallel(model, device, world)

    def forward(step: int) -> Forward:
        latents, labels = data[batch_indices(step, len(data), cfg.data.batch_size, rank, world, tc.seed)]
        x0 = model.normalize(latents.to(device, non_blocking=True))
        with run.autocast:
            loss, terms = flow_matching_loss(ddp_model, x0, _conditions(labels.to(device), model), cfg.flow,
                                             step_generator(tc.seed, step, rank, world, device))
        return Forward(loss, terms, latents.shape[0])

    grids = None
    if main_process and cfg.sample.every:
        if cfg.tokenizer.config:
            grids = GridSampler(cfg, device)
        else:
            log.warning("sample.every=%d but tokenizer.config is unset: no sample grids", cfg.sample.every)

    def sample_grid(done: int, _: Forward) -> Path:
        return grids(model, ema, out_dir / "samples" / f"step_{done:08d}.png")

    run.loop(forward, lambda step: lr_at(step, oc.lr, oc.end_lr, oc.warmup_steps, tc.steps), desc="generator",
             media=sample_grid if grids is not None else None, media_every=cfg.sample.every)
    return {**run.summary(), "model": model, "ema": ema}


def main(argv=None) -> int:
    args = trainer_arguments(argv, __doc__.splitlines()[0], "a shipped generator config (gen/tiny) or a YAML path")
    try:
        cfg = load_gen_config(args.config, args.overrides)
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, RunFolderInUse, CheckpointError, ConfigMismatch) as err:
        log.error("%s", err)
        return 2
    if summary["history"]:
        first, last = summary["history"][0], summary["history"][-1]
        log.info("flow-matching loss %.4f → %.4f over steps %d..%d; checkpoint %s; log %s/log.jsonl", first["flow"],
                 last["flow"], first["step"], last["step"], summary["checkpoint"], summary["out_dir"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
