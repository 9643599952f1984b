"""``make demo-gen``: generation on the tiny tokenizer of ``make demo``. The demo photos (each its own
class) are encoded into latents by ``demo_out/stage3``, a tiny SANA is trained on them by flow matching
for a few minutes on the CPU, and a class-conditional grid is sampled and decoded. Printed: the
flow-matching loss at the start and the end, measured on every latent with one fixed draw of t and ε
(the per-batch training loss is too noisy to compare), for the trained weights and their EMA.

Written to ``demo_out/gen/``: ``shards/`` (labelled photos), ``latents/``, ``run/`` (checkpoints,
log.jsonl, EMA sample grids), ``samples/`` (grid.png and one PNG per sample), ``decoded_latents.png``
(the real latents decoded, for comparison) and ``summary.json``. 18 photos are a memorisation task:
the demo shows the machinery working end to end, not a generator of new images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("muse.gen.demo")


@torch.no_grad()
def fixed_loss(model, data, flow_cfg) -> float:
    """The flow-matching loss over every latent, for one fixed draw of t and ε, no label dropout."""
    from muse.gen.flow import flow_matching_loss
    from muse.gen.train import _conditions

    latents, labels = data[torch.arange(len(data))]
    loss, _ = flow_matching_loss(model.eval(), model.normalize(latents), _conditions(labels, model),
                                 dataclasses.replace(flow_cfg, label_dropout=0.0), torch.Generator().manual_seed(1234))
    return float(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("muse.gen.train", "muse.training"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from muse.data import write_shards
    from muse.demo import CAPTIONS, demo_images
    from muse.gen import latents as latent_tool
    from muse.gen import sample as sample_tool
    from muse.gen.config import load_gen_config
    from muse.gen.latents import LatentDataset
    from muse.gen.model import LatentGenerator
    from muse.gen.train import train
    from muse.training.checkpoint import load_checkpoint

    out = Path(args.out)
    tokenizer_run = out / "stage3"
    if not any(tokenizer_run.glob("step_*.pt")):
        log.error("no tokenizer in %s: run `make demo` first (it trains the tiny tokenizer there)", tokenizer_run)
        return 2
    gen = out / "gen"
    shards = gen / "shards"
    if not list(shards.glob("shard-*.tar")):
        write_shards(({**s, "cls": i} for i, s in enumerate(demo_images())), shards, samples_per_shard=6)
    tokenizer_args = ["--config", "tiny/stage3", "--checkpoint", str(tokenizer_run)]
    started = time.perf_counter()
    # The tokenizer may have been trained again since: its latents are encoded afresh every run.
    shutil.rmtree(gen / "latents", ignore_errors=True)
    if latent_tool.main([*tokenizer_args, "--shards", str(shards / "shard-*.tar"), "--out", str(gen / "latents"),
                         "--device", "cpu"]) != 0:
        return 2
    classes = len(CAPTIONS)
    shown = list(range(8))
    cfg = load_gen_config("gen/tiny", [f"data.latents={gen / 'latents'}", f"train.out_dir={gen / 'run'}",
                                       f"train.steps={args.steps}", f"train.ckpt_every={args.steps}",
                                       f"model.num_classes={classes}", f"sample.every={args.steps}",
                                       f"sample.classes={shown}", "tokenizer.config=tiny/stage3",
                                       f"tokenizer.checkpoint={tokenizer_run}"])
    data = LatentDataset(cfg.data.latents)
    torch.manual_seed(cfg.train.seed)  # the initialisation train() starts from
    initial = LatentGenerator(cfg.model)
    initial.set_latent_stats(data.stats["mean"], data.stats["std"])
    start_loss = fixed_loss(initial, data, cfg.flow)
    log.info("training a tiny SANA (%d layers, width %d) on %d latents %s for %d steps on the CPU ...",
             cfg.model.num_layers, cfg.model.width, len(data), data.stats["latent_shape"], args.steps)
    summary = train(cfg, overwrite=True)
    trained = summary["model"]
    end_loss = fixed_loss(trained, data, cfg.flow)
    ema_model = LatentGenerator(cfg.model)
    ema_model.load_state_dict(load_checkpoint(summary["checkpoint"])["ema"])
    ema_loss = fixed_loss(ema_model, data, cfg.flow)
    if sample_tool.main(["--generator", str(gen / "run"), "--classes", *map(str, shown), "--per-class", "4",
                         "--out", str(gen / "samples"), "--device", "cpu"]) != 0:
        return 2
    from muse.eval.common import load_tokenizer

    tokenizer, _ = load_tokenizer("tiny/stage3", str(tokenizer_run))
    real, _ = data[torch.tensor(shown)]
    sample_tool.save_grid(sample_tool.decode(tokenizer, real), 1, gen / "decoded_latents.png")
    history = summary["history"]
    report = {"steps": args.steps, "latents": len(data), "classes": classes,
              "fixed_draw_loss": {"start": start_loss, "end": end_loss, "end_ema": ema_loss},
              "training_loss_first_10_mean": sum(r["flow"] for r in history[:10]) / len(history[:10]),
              "training_loss_last_10_mean": sum(r["flow"] for r in history[-10:]) / len(history[-10:]),
              "checkpoint": summary["checkpoint"], "seconds": time.perf_counter() - started}
    (gen / "summary.json").write_text(json.dumps(report, indent=1))
    log.info("\nflow-matching loss on the %d demo latents (fixed t and ε): %.4f → %.4f (EMA weights: %.4f) in %d "
             "steps, %.0f s", len(data), start_loss, end_loss, ema_loss, args.steps, report["seconds"])
    log.info("training loss, mean of the first / last 10 logged steps: %.4f → %.4f",
             report["training_loss_first_10_mean"], report["training_loss_last_10_mean"])
    log.info("samples (rows: classes %s, EMA weights, %s %d steps, CFG %.1f): %s; the real latents decoded: %s; "
             "summary: %s", shown, cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg_scale,
             gen / "samples" / "grid.png", gen / "decoded_latents.png", gen / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
