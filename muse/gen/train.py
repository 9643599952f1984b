"""Train the latent generator by flow matching, on the tokenizer's training machinery.

    muse-train-gen --config gen/tiny data.latents=demo_out/latents train.steps=200
    torchrun --nproc_per_node=8 -m muse.gen.train --config gen/sana_600m data.latents=latents/imagenet-train
    muse-train-gen --config gen/sana_600m --resume        # continue from train.out_dir's newest checkpoint

The loop: a batch of latents (normalised by the extraction's per-channel statistics, which the model
keeps as buffers) → eq. 6's loss under autocast → (skip on a non-finite loss) → clipped AdamW step →
EMA → log records, sample grids and atomic checkpoints. Shared with ``muse.train`` through
``muse.training``: run-folder claiming (``--resume`` / ``--overwrite``), DDP setup, autocast, the
finite-loss rule, log records and TensorBoard, EMA, optimizer groups and schedule, checkpoints (atomic,
newest readable on resume, config recorded and checked). Batches, timesteps, noise and label dropout
are functions of (seed, step, rank): an interrupted run resumes bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from muse.gen.config import GenConfig, load_gen_config
from muse.gen.flow import flow_matching_loss
from muse.gen.latents import LatentDataset
from muse.gen.model import LatentGenerator
from muse.training.checkpoint import (CheckpointError, ConfigMismatch, check_config, config_record,
                                      load_model_weights, load_newest_readable, rng_state, save_checkpoint,
                                      set_rng_state)
from muse.training.ema import EMA
from muse.training.loop import (RunFolderInUse, TooManyBadSteps, autocast_for, claim_run_folder,
                                drop_log_records_after, finite_on_every_rank, format_eta, open_tensorboard,
                                setup_distributed, write_record)
from muse.training.optim import build_optimizer, lr_at, set_lr

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
    autocast, use_scaler = autocast_for(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start, bad_in_row, bad_total, checkpoint = 0, 0, 0, None
    found = load_newest_readable(out_dir, map_location=device) if resume else None
    if found is not None:
        checkpoint, state = found
        check_config(state, cfg, f"--resume {checkpoint}", purpose="resume")
        load_model_weights(model, state["model"], f"--resume {checkpoint}")
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"], state["ema_updates"])
        scaler.load_state_dict(state["scaler"])
        start, bad_total = state["step"], state["bad_steps"]
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", checkpoint, start)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    def save(step: int) -> Path | None:
        if not main_process:
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                 "ema_updates": ema.num_updates, "scaler": scaler.state_dict(), "step": step, "rng": rng_state(),
                 "bad_steps": bad_total, **config_record(cfg)}
        return save_checkpoint(state, out_dir, step, tc.keep_last)

    from tqdm import tqdm

    grids = None
    if main_process and cfg.sample.every:
        if cfg.tokenizer.config:
            grids = GridSampler(cfg, device)
        else:
            log.warning("sample.every=%d but tokenizer.config is unset: no sample grids", cfg.sample.every)
    if main_process and resume:
        drop_log_records_after(out_dir / "log.jsonl", start)
    log_file = open(out_dir / "log.jsonl", "a") if main_process else None
    log_progress = main_process and not sys.stderr.isatty()
    writer = open_tensorboard(out_dir) if main_process and tc.tensorboard else None
    last_saved, history, seen, clock = checkpoint, [], 0, time.perf_counter()
    progress = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not main_process or None,
                    desc="generator", unit="step")
    try:
        for step in progress:
            latents, labels = data[batch_indices(step, len(data), cfg.data.batch_size, rank, world, tc.seed)]
            x0 = model.normalize(latents.to(device, non_blocking=True))
            lr = lr_at(step, oc.lr, oc.end_lr, oc.warmup_steps, tc.steps)
            set_lr(optimizer, lr)
            with autocast:
                loss, terms = flow_matching_loss(ddp_model, x0, _conditions(labels.to(device), model), cfg.flow,
                                                 step_generator(tc.seed, step, rank, world, device))
            if not finite_on_every_rank(loss, world):
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite flow-matching loss, step skipped (%d in a row)", step, bad_in_row)
                if bad_in_row > tc.max_bad_steps:
                    raise TooManyBadSteps(f"{bad_in_row} non-finite losses in a row (train.max_bad_steps="
                                          f"{tc.max_bad_steps}); the last good checkpoint in {out_dir} is intact")
                continue
            bad_in_row = 0
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            seen += latents.shape[0] * world

            done = step + 1
            if main_process and (done % tc.log_every == 0 or done == tc.steps or step == start):
                elapsed = time.perf_counter() - clock
                record = {"step": done, "lr": lr, "img_per_s": seen / max(elapsed, 1e-9), "grad_norm": float(grad_norm),
                          "bad_steps": bad_total, **{k: float(v) for k, v in terms.items()}}
                write_record(record, log_file, writer)
                history.append(record)
                progress.set_postfix(loss=f"{record['flow']:.4f}")
                if log_progress:
                    remaining = elapsed / (done - start) * (tc.steps - done)
                    log.info("step %d/%d: %.1f img/s, flow %.4g; ETA %s", done, tc.steps, record["img_per_s"],
                             record["flow"], format_eta(remaining))
            if grids is not None and (done % cfg.sample.every == 0 or done == tc.steps):
                picture = grids(model, ema, out_dir / "samples" / f"step_{done:08d}.png")
                if log_progress:
                    log.info("step %d/%d: samples %s", done, tc.steps, picture)
            if done % tc.ckpt_every == 0 or done == tc.steps:
                last_saved = save(done) or last_saved
                if log_progress:
                    log.info("step %d/%d: checkpoint %s", done, tc.steps, last_saved)
    finally:
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
        progress.close()
    return {"out_dir": str(out_dir), "history": history, "model": model, "ema": ema, "bad_steps": bad_total,
            "checkpoint": str(last_saved) if main_process and last_saved else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a shipped generator config (gen/tiny) or a YAML path")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.out_dir from its newest checkpoint that loads")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a used train.out_dir (its old files are moved aside)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in train.out_dir, --overwrite replaces it: give one")
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
