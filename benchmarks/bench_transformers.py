"""Whole transformers models on the "muse" attention: attention maps at near-SDPA speed (issue 21).

    python -m benchmarks.bench_transformers [--models dinov3_h16plus vit_large qwen2_layer] [--out DIR]

Models (random weights of the published sizes: timing does not depend on the values), bf16:
  * ``dinov3_h16plus``: DINOv3 ViT-H+/16 (the MUSE teacher: hidden 1280, 32 layers, 20 heads, gated
    MLP, 4 registers) at 224² and 448², B = 32, forward (the teacher runs without gradients);
  * ``vit_large``: ViT-L/16 at 512² (1024 patches + CLS), B = 8, forward;
  * ``qwen2_layer``: one Qwen2-style causal decoder layer (hidden 2048, 16 query / 2 kv heads,
    head dim 128) at 4096 tokens, B = 1, forward and forward+backward.
Providers:
  * ``eager_all_maps``: eager attention with ``output_attentions=True`` (every layer's per-head maps,
    what MUSE's teacher did before);
  * ``sdpa``: SDPA without maps (the goal's yardstick);
  * ``muse``: the "muse" attention without maps;
  * ``muse_last_head_mean``: "muse" with ``capture_attention(model, layers=[-1], kind="head_mean")``.
Goal: ``muse_last_head_mean`` ≤ 1.2× ``sdpa`` for the whole model. Needs a CUDA GPU (exits 2 without).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from benchmarks.common import Case, SkipCase, measure, provenance, write_results

log = logging.getLogger("benchmarks.bench_transformers")

OP = "transformers"
MODELS = ("dinov3_h16plus", "vit_large", "qwen2_layer")
PROVIDERS = ("eager_all_maps", "sdpa", "muse", "muse_last_head_mean")
GOAL_RATIO = 1.2


def _dinov3_h16plus(image_size: int):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                             patch_size=16, image_size=image_size, num_register_tokens=4, use_gated_mlp=True,
                             layerscale_value=1e-5)
    return DINOv3ViTModel(config)


def _vit_large(image_size: int):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=image_size, patch_size=16)
    return ViTModel(config, add_pooling_layer=False)


def _qwen2_layer():
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=1024, hidden_size=2048, num_hidden_layers=1, num_attention_heads=16,
                         num_key_value_heads=2, intermediate_size=5632, max_position_embeddings=4096)
    return Qwen2Model(config)


def model_cases() -> list[dict]:
    """(model, shape, builder, inputs, modes) of every benchmarked configuration."""
    cases = []
    for size in (224, 448):
        cases.append(dict(model="dinov3_h16plus", shape=dict(B=32, image=size, tokens=(size // 16) ** 2 + 5),
                          build=lambda s=size: _dinov3_h16plus(s), inputs=lambda d, s=size: {
                              "pixel_values": torch.randn(32, 3, s, s, device=d, dtype=torch.bfloat16)},
                          modes=("fwd",), images=32))
    cases.append(dict(model="vit_large", shape=dict(B=8, image=512, tokens=1025), build=lambda: _vit_large(512),
                      inputs=lambda d: {"pixel_values": torch.randn(8, 3, 512, 512, device=d, dtype=torch.bfloat16)},
                      modes=("fwd",), images=8))
    cases.append(dict(model="qwen2_layer", shape=dict(B=1, tokens=4096), build=_qwen2_layer,
                      inputs=lambda d: {"input_ids": torch.randint(0, 1024, (1, 4096), device=d)},
                      modes=("fwd", "fwd+bwd"), images=0))
    return cases


def _step(model, inputs: dict, provider: str, mode: str):
    from muse_kernels import capture_attention

    output_attentions = provider == "eager_all_maps"

    def forward():
        if provider == "muse_last_head_mean":
            with capture_attention(model, layers=[-1], kind="head_mean", dtype=torch.bfloat16) as maps:
                out = model(**inputs)
            return out.last_hidden_state, maps[-1]
        out = model(**inputs, output_attentions=output_attentions)
        return out.last_hidden_state, (out.attentions[-1] if output_attentions else None)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run

    def run_with_grad():
        hidden, maps = forward()
        loss = hidden.float().square().mean() + (0 if maps is None else maps.float().square().mean())
        loss.backward()
    return run_with_grad


def build_cases(device: torch.device, models: list[str], providers: list[str]) -> list[Case]:
    from muse_kernels.integrations import transformers as muse_hf

    muse_hf.register(backend="auto")
    cases = []
    for spec in model_cases():
        if spec["model"] not in models:
            continue
        for mode in spec["modes"]:
            for provider in providers:
                def setup(spec=spec, provider=provider, mode=mode):
                    implementation = "eager" if provider == "eager_all_maps" else (
                        "sdpa" if provider == "sdpa" else "muse")
                    model = spec["build"]().to(device=device, dtype=torch.bfloat16)
                    model.set_attn_implementation(implementation)
                    model.train(mode != "fwd")
                    try:
                        return _step(model, spec["inputs"](device), provider, mode)
                    except torch.OutOfMemoryError as error:
                        raise SkipCase(f"out of memory while building: {error}") from error
                cases.append(Case(OP, provider, spec["model"], mode, spec["shape"], "bfloat16", setup,
                                  images=spec["images"]))
    return cases


def goal_lines(results) -> list[str]:
    """``muse_last_head_mean`` / ``sdpa`` per (model, shape, mode), against the ≤ 1.2× goal."""
    lines = []
    timed = {(r.variant, str(r.shape), r.mode, r.provider): r.ms_median for r in results if r.status == "ok"}
    for (variant, shape, mode, provider), ms in timed.items():
        sdpa = timed.get((variant, shape, mode, "sdpa"))
        if provider != "muse_last_head_mean" or not sdpa:
            continue
        ratio = ms / sdpa
        eager = timed.get((variant, shape, mode, "eager_all_maps"))
        vs_eager = f", {eager / ms:.2f}x faster than eager with all maps" if eager else ""
        lines.append(f"{variant} {shape} {mode}: last-layer head mean {ms:.2f} ms = {ratio:.2f}x SDPA without maps "
                     f"({'met' if ratio <= GOAL_RATIO else 'missed'}: goal <= {GOAL_RATIO}x){vs_eager}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--out", default="bench_transformers_out", help="results folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: the transformers benchmark needs a GPU")
        return 2
    device = torch.device("cuda")
    info = provenance(device, argv if argv is not None else sys.argv[1:], "benchmarks.bench_transformers")
    results = []
    for case in build_cases(device, args.models, args.providers):
        result = measure(case, device, copy_gbps=None)
        log.info("%s %s %s %s: %s %s", case.variant, case.shape, case.mode, case.provider, result.status,
                 f"{result.ms_median:.2f} ms" if result.ms_median is not None else result.reason)
        results.append(result)
        torch.cuda.empty_cache()
    paths = write_results(results, info, args.out)
    for line in goal_lines(results):
        log.info("%s", line)
    log.info("results: %s", paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
