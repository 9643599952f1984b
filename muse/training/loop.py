"""The training loop of the tokenizer (``muse.train``) and the generator (``muse.gen.train``):
:class:`TrainingRun` resumes a run and loops over its steps, each trainer adding its data, loss and
extras as hooks; and the pieces it is made of: run-folder claiming, distributed setup, autocast, the
finite-loss rule, log records, ETA, TensorBoard."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from muse.training.checkpoint import (FROZEN_PREFIXES, check_config, config_record, list_checkpoints,
                                      load_model_weights, load_newest_readable, rng_state, save_checkpoint,
                                      set_rng_state)
from muse.training.ema import EMA
from muse.training.optim import set_lr

log = logging.getLogger("muse.training")


class TooManyBadSteps(RuntimeError):
    pass


class RunFolderInUse(RuntimeError):
    """A fresh run was pointed at a folder that holds another run."""


def trainer_arguments(argv, description: str, config_help: str) -> argparse.Namespace:
    """Every trainer's command line: ``--config``, ``--resume`` or ``--overwrite``, ``key.sub=value``
    overrides; logging to stderr at INFO."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.out_dir from its newest checkpoint that loads")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a used train.out_dir (its old files are moved aside)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in train.out_dir, --overwrite replaces it: give one")
    return args


def claim_run_folder(out_dir: Path, resume: bool, overwrite: bool, main_process: bool,
                     wait_for_ranks=lambda: None) -> None:
    """A run folder belongs to one run: a fresh run into a non-empty folder would overwrite its
    same-numbered checkpoints, prune its own, append to its log and report its last checkpoint.
    ``resume`` continues the run there; ``overwrite`` moves the old folder aside (``<name>.old-<time>``).
    Every rank looks at the folder (``wait_for_ranks``: a barrier) before rank 0 changes it."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in train.out_dir, --overwrite replaces it: give one")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderInUse(f"train.out_dir {out_dir} is a file, not a folder")
    contents = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if contents and not resume:
        if not overwrite:
            checkpoints = list_checkpoints(out_dir)
            held = (f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}" if checkpoints
                    else ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else ""))
            raise RunFolderInUse(f"train.out_dir {out_dir} already holds a run ({held}): a fresh run would mix "
                                 "with it. Pass --resume to continue it, --overwrite to start over (the old files "
                                 "are moved aside), or choose another train.out_dir")
    wait_for_ranks()
    if contents and not resume and main_process:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
        number = 1
        while aside.exists():
            aside, number = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{number}"), number + 1
        out_dir.rename(aside)
        log.warning("--overwrite: moved the previous run in %s aside to %s", out_dir, aside)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)


def drop_log_records_after(log_path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: their first records would be logged twice."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        log_path.write_text("".join(kept))


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision == "fp16"


def open_tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: scalars go to log.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    """Whether the step's loss is finite on every rank: a step is skipped by all ranks or none."""
    finite = torch.isfinite(loss.detach()).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() == 1


def write_record(record: dict, log_file, writer) -> None:
    """One ``log.jsonl`` line and its TensorBoard scalars (``writer`` None: none)."""
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])


def data_parallel(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """``model`` wrapped for DDP when there are several ranks (the wrapper to call; train ``model``)."""
    if world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@dataclass
class Forward:
    """What a trainer's ``forward`` hook returns for one step: the loss to minimise, its named terms
    (logged), this rank's batch size (for img/s), and whatever of the step the trainer's later hooks
    (``after_step``, ``record``, ``media``) read: ``context``."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    samples: int
    context: Any = None


class TrainingRun:
    """The training loop every trainer shares, over its model, optimizer, EMA and grad scaler:
    :meth:`resume` from the newest readable checkpoint, then :meth:`loop` up to ``train.steps``.

    ``cfg`` has a ``train`` section (steps, out_dir, precision, log_every, ckpt_every, keep_last,
    max_bad_steps, tensorboard) and ``optim.grad_clip``; ``log`` is the trainer's logger (its progress
    lines and warnings keep the trainer's name). The trainer's own parts (its data, loss, a
    discriminator, pictures) come to :meth:`loop` as hooks."""

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
                 device: torch.device, rank: int, world: int, log: logging.Logger):
        self.cfg, self.model, self.optimizer, self.ema, self.log = cfg, model, optimizer, ema, log
        self.device, self.world, self.main_process = device, world, rank == 0
        self.out_dir = Path(cfg.train.out_dir)
        self.autocast, use_scaler = autocast_for(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.start, self.bad_steps = 0, 0
        self.checkpoint: Path | None = None  # the newest one written (or resumed from)
        self.history: list[dict] = []

    def resume(self) -> dict | None:
        """Load the newest readable checkpoint of ``train.out_dir``: model, optimizer, EMA, scaler, step,
        bad-step count and RNG. Returns its state, for the trainer's own parts (None: there is none, the
        run starts from scratch). The records after its step leave ``log.jsonl``: those steps are redone."""
        found = load_newest_readable(self.out_dir, map_location=self.device)
        state = None
        if found is None:
            self.log.info("--resume: no checkpoint in %s, starting from scratch", self.out_dir)
        else:
            self.checkpoint, state = found
            where = f"--resume {self.checkpoint}"
            check_config(state, self.cfg, where, purpose="resume")
            load_model_weights(self.model, state["model"], where)
            self.optimizer.load_state_dict(state["optimizer"])
            # The first tokenizer checkpoints recorded neither: one EMA update a step, no bad steps.
            self.ema.load_state_dict(state["ema"], state.get("ema_updates", state["step"]))
            self.scaler.load_state_dict(state["scaler"])
            self.start, self.bad_steps = state["step"], state.get("bad_steps", 0)
            set_rng_state(state["rng"])
            self.log.info("resumed from %s at step %d", self.checkpoint, self.start)
        if self.main_process:
            drop_log_records_after(self.out_dir / "log.jsonl", self.start)
        return state

    def _save(self, step: int, extra_state: Callable[[], dict] | None) -> Path | None:
        extra = extra_state() if extra_state is not None else {}  # on every rank: it may gather across ranks
        if not self.main_process:
            return None
        state = {"model": {k: v for k, v in self.model.state_dict().items() if not k.startswith(FROZEN_PREFIXES)},
                 "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                 "ema_updates": self.ema.num_updates, "scaler": self.scaler.state_dict(), "step": step,
                 "rng": rng_state(), "bad_steps": self.bad_steps, **extra, **config_record(self.cfg)}
        return save_checkpoint(state, self.out_dir, step, self.cfg.train.keep_last)

    def loop(self, forward: Callable[[int], Forward], lr: Callable[[int], float], *, desc: str,
             after_step: Callable[[int, Forward], dict] | None = None,
             record: Callable[[int, Forward], dict] | None = None,
             media: Callable[[int, Forward], Path | None] | None = None, media_every: int = 0,
             extra_state: Callable[[], dict] | None = None) -> None:
        """Train from the resumed step to ``train.steps``. The trainer's hooks:

        - ``forward(step)``: reads the step's batch, runs model and loss under ``self.autocast``;
        - ``lr(step)``: the learning rate;
        - ``after_step(step, forward)``: runs after the optimizer step and the EMA update (the
          tokenizer's discriminator update); returns more terms to log;
        - ``record(done, forward)``: a log record's fields after step, lr, img_per_s, grad_norm and
          bad_steps (default: the loss terms), on rank 0 every ``train.log_every`` steps;
        - ``media(done, forward)``: pictures, on rank 0 every ``media_every`` steps (0: never) and at the
          end; returns the file it wrote, for the progress log, or None;
        - ``extra_state()``: the trainer's checkpoint entries, called on every rank at each checkpoint."""
        from tqdm import tqdm

        tc, start, log = self.cfg.train, self.start, self.log
        log_file = open(self.out_dir / "log.jsonl", "a") if self.main_process else None
        # Off a terminal (CI, nohup, a cluster log) the bar draws nothing: log lines carry the progress.
        log_progress = self.main_process and not sys.stderr.isatty()
        writer = open_tensorboard(self.out_dir) if self.main_process and tc.tensorboard else None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        bad_in_row, samples_seen, clock = 0, 0, time.perf_counter()
        progress = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not self.main_process or None,
                        desc=desc, unit="step")
        try:
            for step in progress:
                rate = lr(step)
                set_lr(self.optimizer, rate)
                out = forward(step)
                if not finite_on_every_rank(out.loss, self.world):
                    bad_in_row, self.bad_steps = bad_in_row + 1, self.bad_steps + 1
                    self.optimizer.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss (%s), step skipped (%d in a row)", step,
                                {k: float(v) for k, v in out.terms.items()}, bad_in_row)
                    if bad_in_row > tc.max_bad_steps:
                        raise TooManyBadSteps(
                            f"{bad_in_row} non-finite losses in a row (train.max_bad_steps={tc.max_bad_steps}); "
                            f"stopping. The last good checkpoint in {self.out_dir} is intact: resume from it with "
                            "a lower learning rate or fix the data.")
                    continue
                bad_in_row = 0
                self.scaler.scale(out.loss).backward()
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.model)
                if after_step is not None:
                    out.terms |= after_step(step, out)
                samples_seen += out.samples * self.world

                done = step + 1
                if self.main_process and (done % tc.log_every == 0 or done == tc.steps or step == start):
                    elapsed = time.perf_counter() - clock
                    entry = {"step": done, "lr": rate, "img_per_s": samples_seen / max(elapsed, 1e-9),
                             "grad_norm": float(grad_norm), "bad_steps": self.bad_steps,
                             **(record(done, out) if record is not None else
                                {k: float(v) for k, v in out.terms.items()})}
                    write_record(entry, log_file, writer)
                    self.history.append(entry)
                    progress.set_postfix(loss=f"{out.loss.item():.4f}", img_s=f"{entry['img_per_s']:.1f}")
                    if log_progress:
                        remaining = elapsed / (done - start) * (tc.steps - done)
                        log.info("step %d/%d: %.1f img/s, %s; ETA %s", done, tc.steps, entry["img_per_s"],
                                 ", ".join(f"{k} {float(v):.4g}" for k, v in out.terms.items()),
                                 format_eta(remaining))
                if (media is not None and self.main_process and media_every
                        and (done % media_every == 0 or done == tc.steps)):
                    picture = media(done, out)
                    if picture is not None and log_progress:
                        log.info("step %d/%d: samples %s", done, tc.steps, picture)
                if done % tc.ckpt_every == 0 or done == tc.steps:
                    self.checkpoint = self._save(done, extra_state) or self.checkpoint
                    if log_progress:
                        log.info("step %d/%d: checkpoint %s", done, tc.steps, self.checkpoint)
        finally:
            if log_file is not None:
                log_file.close()
            if writer is not None:
                writer.close()
            progress.close()

    def summary(self) -> dict:
        """The part of a trainer's return value that every trainer has."""
        return {"out_dir": str(self.out_dir), "history": self.history, "bad_steps": self.bad_steps,
                "checkpoint": str(self.checkpoint) if self.main_process and self.checkpoint else None}
