"""Pieces of the training loop shared by the tokenizer's (``muse.train``) and the generator's
(``muse.gen.train``): run-folder claiming, distributed setup, autocast, log records, ETA, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from muse.training.checkpoint import list_checkpoints

log = logging.getLogger("muse.training")


class TooManyBadSteps(RuntimeError):
    pass


class RunFolderInUse(RuntimeError):
    """A fresh run was pointed at a folder that holds another run."""


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
