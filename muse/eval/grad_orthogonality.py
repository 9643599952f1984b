"""grad-orthogonality: do the losses fight over the shared weights?

For a tokenizer and a few batches, the cosine between the gradients of every pair of losses
(reconstruction, topology, ITC) on each parameter group of the Synergistic blocks (Q/K, V, rest),
for MUSE's block and for a "naive shared" variant at the same weights (no gradient shield, so the
output's losses reach Q/K too). The paper's Table 4 / Figure 2: naive negative, MUSE ≈ 0, and
exactly 0 on Q/K for losses that cannot reach them. The ITC loss reads the text encoder: a randomly
initialised one is refused unless ``--allow-random-text-encoder`` says so.

    python -m muse.eval.grad_orthogonality --config tiny --checkpoint demo_out/stage3 \\
        --shards 'demo_out/shards/*.tar' --batches 4 --out orthogonality/
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import statistics
import sys
from pathlib import Path


from muse.data import DataError, ShardStream, Source, collate, expand_shards
from muse.eval.common import add_model_arguments, add_text_arguments, positive_int, require_pretrained_text
from muse.losses import reconstruction_loss
from muse.models import ClipTextEncoder, MuseTokenizer, build_tokenizer
from muse.training.analysis import gradient_cosines

log = logging.getLogger("muse.eval")
VARIANTS = ("muse", "naive")


def variant_model(model: MuseTokenizer, variant: str) -> MuseTokenizer:
    """A copy of ``model`` with its blocks shielded (``muse``) or not (``naive``), same weights."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    copy_ = copy.deepcopy(model)
    copy_.cfg = copy.deepcopy(model.cfg)
    if variant == "naive":
        # The fused loss needs the shield; the naive block takes the KL on its materialized maps.
        copy_.cfg.fused_topology = False
    for block in copy_.muse_blocks:
        block.shield = variant == "muse"
    return copy_


def measure(model: MuseTokenizer, batches, text_encoder=None, tokenize=None) -> dict[str, list[dict[str, float]]]:
    """{variant: [per-batch {"<loss_a>|<loss_b>/<group>": cosine}]}."""
    results = {}
    for variant in VARIANTS:
        m = variant_model(model, variant)
        results[variant] = []
        device = next(m.parameters()).device
        for batch in batches:
            images = batch["images"].to(device)
            text = None
            if text_encoder is not None:
                text = text_encoder(**{k: v.to(device) for k, v in tokenize(batch["captions"]).items()})
            out = m(images, text_embeds=text)
            losses = {"rec": reconstruction_loss(out.reconstruction, images), "topo": out.loss_topo}
            if out.loss_itc is not None:
                losses["itc"] = out.loss_itc
            results[variant].append(gradient_cosines(m, losses))
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> list[dict]:
    rows = []
    for variant, per_batch in results.items():
        for key in per_batch[0]:
            values = [b[key] for b in per_batch]
            pair, group = key.split("/")
            rows.append({"variant": variant, "pair": pair, "group": group, "mean": statistics.fmean(values),
                         "std": statistics.pstdev(values), "batches": len(values), "values": values})
    return rows


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no violin plot")
        return None
    keys = sorted({(r["pair"], r["group"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    for offset, variant in ((-0.18, "naive"), (0.18, "muse")):
        data = [next((r["values"] for r in rows if r["variant"] == variant and (r["pair"], r["group"]) == k), [0.0])
                for k in keys]
        color = "tab:red" if variant == "naive" else "tab:blue"
        parts = ax.violinplot(data, positions=[i + offset for i in range(len(keys))], widths=0.32, showmeans=True)
        for body in parts["bodies"]:
            body.set_facecolor(color)
        for line in ("cmeans", "cmins", "cmaxes", "cbars"):
            parts[line].set_color(color)
        ax.plot([], [], color=color, label=variant)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{p}\n{g}" for p, g in keys], fontsize=8)
    ax.set_ylabel("gradient cosine")
    ax.set_title("Gradient orthogonality on the Synergistic blocks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Gradient cosines between MUSE's losses, MUSE vs naive blocks")
    add_model_arguments(parser)
    add_text_arguments(parser)
    parser.add_argument("--shards", required=True, help="shard pattern")
    parser.add_argument("--batches", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from muse.eval.common import load_from_args

    try:
        model, cfg = load_from_args(args)
        require_pretrained_text(cfg, args.allow_random_text_encoder, "grad-orthogonality")
        shards = expand_shards(args.shards)
        stream = ShardStream([Source(shards)], cfg.model.image_size, seed=0, train=False)
        samples = iter(stream)
        batches = [collate(list(itertools.islice(samples, args.batch_size))) for _ in range(args.batches)]
    except (FileNotFoundError, ValueError, DataError) as err:  # DataError: shards with nothing readable
        log.error("%s", err)
        return 2
    text_encoder = ClipTextEncoder(cfg.model.text).to(args.device)
    rows = summarize(measure(model.train(), batches, text_encoder, build_tokenizer(cfg.model.text)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "orthogonality.json").write_text(json.dumps(rows, indent=1))
    picture = plot(rows, out / "orthogonality.png")
    for r in rows:
        log.info("%-6s %-10s %-5s %+.4f ± %.4f", r["variant"], r["pair"], r["group"], r["mean"], r["std"])
    log.info("wrote %s%s", out / "orthogonality.json", f" and {picture}" if picture else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
