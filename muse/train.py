"""Train the MUSE tokenizer, one stage at a time.

    muse-train --config tiny/stage1 train.steps=100 data.batch_size=8
    torchrun --nproc_per_node=8 -m muse.train --config muse_1b/stage1
    muse-train --config muse_1b/stage1 --resume          # continue from out_dir's last checkpoint

The loop is ``muse.training.loop``'s, shared with the generator: data → forward under autocast →
weighted losses → (skip the step on a non-finite loss) → clipped AdamW step → EMA → discriminator
step (stage 3, here) → logs, pictures and atomic checkpoints.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from muse.config import Config, load_config
from muse.data import DataError, ShardStream, Source, collate, expand_shards, stream_counts
from muse.losses import MuseLoss, reconstruction_loss
from muse.models import ClipTextEncoder, MuseTokenizer, build_tokenizer
from muse.models.discriminator import NLayerDiscriminator, load_official_discriminator
from muse.models.official import is_official_checkpoint
from muse.models.perceptual import PerceptualLoss, build_perceptual_loss
from muse.training.checkpoint import (FROZEN_PREFIXES, CheckpointError, ConfigMismatch, check_config,
                                      load_file_or_newest, load_model_weights)
from muse.training.analysis import gradient_cosines, save_attention_grid, save_reconstruction_grid
from muse.training.ema import EMA
# TooManyBadSteps is imported from here too (by callers of train).
from muse.training.loop import (Forward, RunFolderInUse, TooManyBadSteps, TrainingRun,  # noqa: F401
                                 claim_run_folder, data_parallel, setup_distributed, trainer_arguments)
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
    file, state = load_file_or_newest(path, "train.init_weight")
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
    run = TrainingRun(cfg, model, optimizer, ema, device, rank, world, log)

    positions, disc_updates = {}, 0
    state = run.resume() if resume else None
    if state is not None:
        if discriminator is not None:
            discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
            loss_fn.lecam.load_state_dict(state["lecam"])
            disc_updates = state.get("disc_updates", 0)
        positions = state["positions"]
    ddp_model = data_parallel(model, device, world)
    _, loader = build_loader(cfg, rank, world, positions, run.start)
    batches = iter(loader)

    def forward(step: int) -> Forward:
        batch = next(batches)
        # Consumed even if the step is skipped: a resumed run must not read it again.
        positions.update(batch["positions"])  # a part's state after its last sample in this batch
        images = batch["images"].to(device, non_blocking=True)
        text_embeds = None
        if text_encoder is not None:
            tokens = {k: v.to(device) for k, v in tokenize(batch["captions"]).items()}
            text_embeds = text_encoder(**tokens)
        adversarial = discriminator is not None and step >= cfg.loss.disc_start
        with run.autocast:
            out = ddp_model(images, text_embeds=text_embeds)
            loss, terms = loss_fn(out, images, text_embeds, adversarial=adversarial)
        return Forward(loss, terms, images.shape[0], {"images": images, "text_embeds": text_embeds, "out": out})

    def discriminator_step(step: int, step_out: Forward) -> dict:
        nonlocal disc_updates
        if step < cfg.loss.disc_start:
            return {}
        with run.autocast:
            d_loss, d_terms = loss_fn.discriminator_loss(step_out.context["out"].reconstruction,
                                                         step_out.context["images"])
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
        return d_terms

    def record_fields(done: int, step_out: Forward) -> dict:
        fields = {**stream_counts(positions), **{k: float(v) for k, v in step_out.terms.items()}}
        if tc.ortho_every and (done % tc.ortho_every == 0 or done == tc.steps):
            cosines = orthogonality(model, loss_fn, step_out.context["images"], step_out.context["text_embeds"],
                                    run.autocast)
            fields |= {f"cos/{k}": v for k, v in cosines.items()}
        return fields

    def pictures(done: int, step_out: Forward) -> None:
        save_pictures(model, step_out.context["images"], step_out.context["text_embeds"], out_dir / "images", done)

    def checkpoint_state() -> dict:
        all_positions = dict(positions)
        if world > 1:
            # Each rank reads its own shard parts: the checkpoint records every rank's position.
            gathered = [None] * world
            dist.all_gather_object(gathered, positions)
            for ranks_positions in gathered:
                all_positions.update(ranks_positions)
        state = {"positions": all_positions, "stage": tc.stage}
        if discriminator is not None:
            state |= {"discriminator": discriminator.state_dict(), "disc_optimizer": disc_optimizer.state_dict(),
                      "lecam": loss_fn.lecam.state_dict(), "disc_updates": disc_updates}
        return state

    run.loop(forward, lambda step: lr_at(step, oc.lr, oc.end_lr, oc.warmup_steps, tc.steps),
             desc=f"stage {tc.stage}", after_step=discriminator_step if discriminator is not None else None,
             record=record_fields, media=pictures, media_every=tc.image_every, extra_state=checkpoint_state)
    return {"stage": tc.stage, **run.summary(), "model": model, "discriminator": discriminator,
            **stream_counts(positions), "trainable_parameters": len(trainable)}


def main(argv=None) -> int:
    args = trainer_arguments(argv, __doc__.splitlines()[0], "a shipped config name (tiny/stage1) or a YAML path")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        log.error("config error: %s", err)
        return 2
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
