"""Train the MUSE tokenizer, one stage at a time.

    muse-train --config tiny/stage1 train.steps=100 data.batch_size=8
    torchrun --nproc_per_node=8 -m muse.train --config muse_1b/stage1
    muse-train --config muse_1b/stage1 --resume          # continue from out_dir's last checkpoint

One readable loop: data → forward under autocast → weighted losses → (skip the step on a non-finite
loss) → clipped AdamW step → EMA → discriminator step (stage 3) → logs and atomic checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from muse.config import Config, load_config
from muse.data import DataError, ShardStream, Source, collate, expand_shards, stream_counts
from muse.losses import MuseLoss, reconstruction_loss
from muse.models import ClipTextEncoder, MuseTokenizer, build_tokenizer
from muse.models.discriminator import NLayerDiscriminator, load_official_discriminator
from muse.models.official import is_official_checkpoint
from muse.models.perceptual import PerceptualLoss, build_perceptual_loss
from muse.training.checkpoint import (FROZEN_PREFIXES, CheckpointError, ConfigMismatch, check_config,
                                      config_record, load_checkpoint, load_model_weights,
                                      load_newest_readable, rng_state, save_checkpoint, set_rng_state)
from muse.training.analysis import gradient_cosines, save_attention_grid, save_reconstruction_grid
from muse.training.ema import EMA
from muse.training.loop import (RunFolderInUse, TooManyBadSteps, autocast_for, claim_run_folder,
                                 drop_log_records_after, finite_on_every_rank, format_eta, open_tensorboard,
                                 setup_distributed, write_record)
from muse.training.optim import (build_discriminator_optimizer, build_optimizer, discriminator_schedule, lr_at,
                                 set_lr)
from muse.training.stages import configure_stage

log = logging.getLogger("muse.train")


def build_loader(cfg: Config, rank: int, world: int, positions: dict[int, dict], start_step: int = 0):
    dc = cfg.data
    sources = []
    for index, pattern in enumerate(dc.shards):
        if not pattern:
            raise ValueError(f"data.shards[{index}] is empty (an unset environment variable?)")
        ratio = dc.ratios[index] if dc.ratios else 1.0
        fields = tuple(dc.json_caption_fields[index]) if dc.json_caption_fields else None
        sources.append(Source(expand_shards(pattern), ratio, fields or None))
    if not sources:
        raise ValueError("data.shards is empty: give at least one shard pattern")
    # Blocks of one batch come from one source: every batch is drawn from one source, as officially.
    stream = ShardStream(sources, cfg.model.image_size, seed=cfg.train.seed, rank=rank, world_size=world,
                         resume_positions=positions, worker_offset=start_step, batch_size=dc.batch_size,
                         shuffle_size=dc.shuffle_buffer, shuffle_initial=dc.shuffle_initial,
                         max_bad_in_row=dc.max_bad_in_row)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                                         collate_fn=collate, pin_memory=torch.cuda.is_available())
    return stream, loader


def build_perceptual(cfg: Config, device: torch.device) -> PerceptualLoss | None:
    lc = cfg.loss
    if not lc.perceptual:
        return None
    return build_perceptual_loss(lc.vgg16_weights, lc.convnext_weights, lc.lpips_heads, lc.lpips_weight,
                                 lc.convnext_weight, lc.convnext_resolution).to(device)


def build_discriminator(cfg: Config, device: torch.device) -> NLayerDiscriminator | None:
    lc = cfg.loss
    if not (lc.gan or lc.lecam):
        return None
    return NLayerDiscriminator(hidden_channels=lc.disc_channels, stages=lc.disc_stages, blur=lc.disc_blur,
                               blur_kernel_size=lc.disc_blur_kernel_size, pool_size=lc.disc_pool_size).to(device)


def init_from_previous_stage(model: MuseTokenizer, path: str, cfg: Config) -> None:
    """Load the EMA weights of an earlier stage's checkpoint (a file, or a run folder's newest readable
    one), refusing one trained with another architecture. An official MUSE checkpoint (its
    ``model.safetensors``, ``ema_model/pytorch_model.bin`` or checkpoint folder) loads strictly."""
    if is_official_checkpoint(path):
        info = model.load_official_checkpoint(path)
        log.info("initialised from the official checkpoint %s", info["file"])
        return
    if Path(path).is_dir():
        found = load_newest_readable(path)
        if found is None:
            raise FileNotFoundError(f"train.init_weight: no checkpoint in {path}")
        file, state = found
    elif Path(path).exists():
        file, state = Path(path), load_checkpoint(path)
    else:
        raise FileNotFoundError(f"train.init_weight: no checkpoint at {path}")
    check_config(state, cfg, f"train.init_weight {file}", purpose="init")
    load_model_weights(model, state["ema"], f"train.init_weight {file}")
    log.info("initialised from the EMA weights of %s", file)


def orthogonality(model: MuseTokenizer, loss_fn: MuseLoss, images, text_embeds, autocast) -> dict[str, float]:
    """Cosines between the reconstruction, topology and (with text) ITC gradients on the blocks."""
    with autocast:
        out = model(images, text_embeds=text_embeds)
    losses = {"rec": reconstruction_loss(out.reconstruction, images, loss_fn.reconstruction_kind)}
    if out.loss_topo is not None:
        losses["topo"] = out.loss_topo
    if out.loss_itc is not None:
        losses["itc"] = out.loss_itc
    return gradient_cosines(model, losses)


@torch.no_grad()
def save_pictures(model: MuseTokenizer, images, text_embeds, directory: Path, step: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    out = model(images[:4], return_maps=True)
    model.train(was_training)
    save_reconstruction_grid(images[:4], out.reconstruction, directory / f"step_{step:08d}_reconstruction.png")
    student = out.maps[-1] if out.maps[-1].dim() == 3 else out.maps[-1].mean(1)
    side = int(round(student.shape[-1] ** 0.5))
    save_attention_grid(images[:4], out.teacher_maps, student, (side, side),
                        directory / f"step_{step:08d}_attention.png")


def _trainable_state(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """One stage. ``resume``: continue the run in ``train.out_dir`` from its newest readable checkpoint;
    ``overwrite``: move a previous run there aside and start over (without either, a non-empty
    ``train.out_dir`` is refused: :class:`RunFolderInUse`)."""
    rank, world, device = setup_distributed()
    main_process = rank == 0
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    claim_run_folder(out_dir, resume, overwrite, main_process, dist.barrier if world > 1 else lambda: None)
    # The same seed on every rank: DDP broadcasts the tokenizer's weights, but the discriminator and any
    # randomly initialised loss network are built by each rank and must start identical too.
    torch.manual_seed(tc.seed)

    model = MuseTokenizer(cfg.model).to(device)
    if tc.init_weight:
        init_from_previous_stage(model, tc.init_weight, cfg)
    trainable = configure_stage(model, tc.stage)
    weights = cfg.loss
    discriminator = build_discriminator(cfg, device)
    loss_fn = MuseLoss(weights, build_perceptual(cfg, device), discriminator, cfg.loss.reconstruction_kind,
                       cfg.loss.lecam_decay, cfg.loss.disc_factor).to(device)
    if discriminator is not None and cfg.loss.disc_init:
        load_official_discriminator(cfg.loss.disc_init, discriminator, loss_fn.lecam)
    text_encoder = ClipTextEncoder(cfg.model.text).to(device) if weights.itc else None
    tokenize = build_tokenizer(cfg.model.text) if weights.itc else None
    oc = cfg.optim
    optimizer = build_optimizer(model, oc.lr, oc.weight_decay, oc.betas, oc.backbone_lr_scale, oc.no_decay_keywords)
    disc_optimizer = disc_schedule = None
    if discriminator is not None:
        disc_decay = oc.weight_decay if oc.disc_weight_decay is None else oc.disc_weight_decay
        disc_optimizer = build_discriminator_optimizer(discriminator, oc.disc_lr, disc_decay, oc.betas,
                                                       oc.no_decay_keywords)
        disc_schedule = discriminator_schedule(oc, tc.steps, cfg.loss.disc_start)
    disc_clip = oc.grad_clip if oc.disc_grad_clip is None else oc.disc_grad_clip
    ema = EMA(model, tc.ema_decay, skip_prefixes=FROZEN_PREFIXES, warmup=tc.ema_warmup)
    torch.manual_seed(tc.seed + rank)
    autocast, use_scaler = autocast_for(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start, positions, bad_in_row, bad_total, disc_updates = 0, {}, 0, 0, 0
    found = load_newest_readable(out_dir, map_location=device) if resume else None
    checkpoint = None
    if found is not None:
        checkpoint, state = found
        check_config(state, cfg, f"--resume {checkpoint}", purpose="resume")
        load_model_weights(model, state["model"], f"--resume {checkpoint}")
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"], state.get("ema_updates", state["step"]))
        scaler.load_state_dict(state["scaler"])
        if discriminator is not None:
            discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
            loss_fn.lecam.load_state_dict(state["lecam"])
            disc_updates = state.get("disc_updates", 0)
        start, positions, bad_total = state["step"], state["positions"], state.get("bad_steps", 0)
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", checkpoint, start)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)

    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    _, loader = build_loader(cfg, rank, world, positions, start)
    batches = iter(loader)

    def save(step: int) -> Path | None:
        all_positions = dict(positions)
        if world > 1:
            # Each rank reads its own shard parts: the checkpoint records every rank's position.
            gathered = [None] * world
            dist.all_gather_object(gathered, positions)
            for ranks_positions in gathered:
                all_positions.update(ranks_positions)
        if not main_process:
            return None
        state = {"model": _trainable_state(model), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "positions": all_positions, "rng": rng_state(),
                 "bad_steps": bad_total, "stage": tc.stage, "ema_updates": ema.num_updates, **config_record(cfg)}
        if discriminator is not None:
            state |= {"discriminator": discriminator.state_dict(), "disc_optimizer": disc_optimizer.state_dict(),
                      "lecam": loss_fn.lecam.state_dict(), "disc_updates": disc_updates}
        return save_checkpoint(state, out_dir, step, tc.keep_last)

    from tqdm import tqdm

    if main_process and resume:  # from scratch (start 0) when no checkpoint was left
        drop_log_records_after(out_dir / "log.jsonl", start)
    log_file = open(out_dir / "log.jsonl", "a") if main_process else None
    # Off a terminal (CI, nohup, a cluster log) the bar draws nothing: log lines carry the progress.
    log_progress = main_process and not sys.stderr.isatty()
    last_saved = checkpoint
    writer = open_tensorboard(out_dir) if main_process and tc.tensorboard else None
    history, images_seen, clock = [], 0, time.perf_counter()
    progress = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not main_process or None,
                    desc=f"stage {tc.stage}", unit="step")
    try:
        for step in progress:
            batch = next(batches)
            # Consumed even if the step is skipped below: a resumed run must not read it again.
            positions.update(batch["positions"])  # a part's state after its last sample in this batch
            images = batch["images"].to(device, non_blocking=True)
            text_embeds = None
            if text_encoder is not None:
                tokens = {k: v.to(device) for k, v in tokenize(batch["captions"]).items()}
                text_embeds = text_encoder(**tokens)
            lr = lr_at(step, oc.lr, oc.end_lr, oc.warmup_steps, tc.steps)
            set_lr(optimizer, lr)
            adversarial = discriminator is not None and step >= cfg.loss.disc_start
            with autocast:
                out = ddp_model(images, text_embeds=text_embeds)
                loss, terms = loss_fn(out, images, text_embeds, adversarial=adversarial)
            if not finite_on_every_rank(loss, world):
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss (%s), step skipped (%d in a row)", step,
                            {k: float(v) for k, v in terms.items()}, bad_in_row)
                if bad_in_row > tc.max_bad_steps:
                    raise TooManyBadSteps(
                        f"{bad_in_row} non-finite losses in a row (train.max_bad_steps={tc.max_bad_steps}); "
                        f"stopping. The last good checkpoint in {out_dir} is intact: resume from it with a lower "
                        "learning rate or fix the data.")
                continue
            bad_in_row = 0
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       oc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            if adversarial:
                with autocast:
                    d_loss, d_terms = loss_fn.discriminator_loss(out.reconstruction, images)
                # The generator's GAN term left gradients on the discriminator: its update uses only its own loss.
                disc_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                if world > 1:
                    # The discriminator runs three forwards a step (not DDP's one): average its gradients here.
                    for param in discriminator.parameters():
                        dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
                    # LeCam's EMAs follow each rank's batch means: keep the ranks' averages identical.
                    for buffer in loss_fn.lecam.buffers():
                        dist.all_reduce(buffer, op=dist.ReduceOp.AVG)
                torch.nn.utils.clip_grad_norm_(discriminator.parameters(), disc_clip)
                # Its own schedule, counted in discriminator updates (official).
                set_lr(disc_optimizer, lr_at(disc_updates, **disc_schedule))
                disc_optimizer.step()
                disc_optimizer.zero_grad(set_to_none=True)
                disc_updates += 1
                terms |= d_terms
            images_seen += images.shape[0] * world

            done = step + 1
            if main_process and (done % tc.log_every == 0 or done == tc.steps or step == start):
                elapsed = time.perf_counter() - clock
                record = {"step": done, "lr": lr, "img_per_s": images_seen / max(elapsed, 1e-9),
                          "grad_norm": float(grad_norm), "bad_steps": bad_total, **stream_counts(positions),
                          **{k: float(v) for k, v in terms.items()}}
                if tc.ortho_every and (done % tc.ortho_every == 0 or done == tc.steps):
                    record |= {f"cos/{k}": v for k, v in
                               orthogonality(model, loss_fn, images, text_embeds, autocast).items()}
                write_record(record, log_file, writer)
                history.append(record)
                progress.set_postfix(loss=f"{record['total']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                if log_progress:
                    remaining = elapsed / (done - start) * (tc.steps - done)
                    log.info("step %d/%d: %.1f img/s, %s; ETA %s", done, tc.steps, record["img_per_s"],
                             ", ".join(f"{k} {float(v):.4g}" for k, v in terms.items()), format_eta(remaining))
            if main_process and tc.image_every and (done % tc.image_every == 0 or done == tc.steps):
                save_pictures(model, images, text_embeds, out_dir / "images", done)
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
    return {"stage": tc.stage, "out_dir": str(out_dir), "history": history, "model": model,
            "discriminator": discriminator,
            "checkpoint": str(last_saved) if main_process and last_saved else None, "bad_steps": bad_total,
            **stream_counts(positions), "trainable_parameters": len(trainable)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a shipped config name (tiny/stage1) or a YAML path")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.out_dir from its newest checkpoint that loads")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a used train.out_dir (its old files are moved aside)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        log.error("config error: %s", err)
        return 2
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in train.out_dir, --overwrite replaces it: give one")
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (RunFolderInUse, CheckpointError, ConfigMismatch, DataError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    if summary["history"]:
        first, last = summary["history"][0], summary["history"][-1]
        log.info("stage %d: loss %.4f → %.4f over %d steps, %.1f img/s; checkpoint %s; log %s/log.jsonl",
                 summary["stage"], first["total"], last["total"], last["step"], last["img_per_s"],
                 summary["checkpoint"], summary["out_dir"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
