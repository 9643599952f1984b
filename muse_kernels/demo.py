"""End-to-end kernel demo: ``python -m muse_kernels.demo`` (what ``make demo`` runs).

Runs a Synergistic attention layer at a MUSE-like shape through the fused Triton kernels (on a GPU,
or on CPU under the Triton interpreter) and through the eager PyTorch reference, and reports what it
checked: outputs, maps and every gradient against an fp64 reference, and the gradient shield.
Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

log = logging.getLogger("muse_kernels.demo")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def run(batch: int, tokens: int, dim: int, heads: int, device: torch.device) -> bool:
    from muse_kernels import SynergisticAttention

    torch.manual_seed(0)
    fused = SynergisticAttention(dim, num_heads=heads, backend="triton").to(device)
    reference = SynergisticAttention(dim, num_heads=heads, backend="torch").double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(batch, tokens, dim)
    teacher_logits = torch.randn(batch, tokens, tokens)

    def step(module, inp):
        out, attn = module(inp, return_attn="head_mean")
        # A stand-in for MUSE's losses: one on the output (reconstruction/semantics) and a KL of the
        # head-mean map against a teacher distribution (topology).
        teacher = torch.softmax(teacher_logits.to(attn), -1)
        topo = (teacher * (teacher.log() - (attn + 1e-8).log())).sum(-1).mean()
        (out.pow(2).mean() + topo).backward()
        return out, attn, topo

    start = time.perf_counter()
    out, attn, topo = step(fused, x.to(device))
    elapsed = time.perf_counter() - start
    out64, attn64, topo64 = step(reference, x.double())

    checks = [
        ("output vs fp64 reference", _max_err(out, out64), 1e-4),
        ("head-mean maps vs fp64 reference", _max_err(attn, attn64), 1e-5),
        ("topology KL vs fp64 reference", _max_err(topo, topo64), 1e-5),
        ("map rows sum to 1", _max_err(attn.sum(-1), torch.ones(())), 1e-5),
    ]
    for name, p in fused.named_parameters():
        ref = dict(reference.named_parameters())[name].grad
        # Relative to the gradient's own size: parameter gradients here are far below 1.
        checks.append((f"grad {name} vs fp64 reference", _max_err(p.grad, ref), 1e-4 * ref.abs().max().item()))

    # The fused loss: the same KL straight from q and k, no N×N map in memory.
    teacher = torch.softmax(teacher_logits, -1)
    fused.zero_grad()
    reference.zero_grad()
    out, kl = fused(x.to(device), teacher=teacher.to(device))
    (out.pow(2).mean() + kl).backward()
    out64, kl64 = reference(x.double(), teacher=teacher.double())
    (out64.pow(2).mean() + kl64).backward()
    checks.append(("fused topology KL (no maps) vs fp64 reference", _max_err(kl, kl64), 1e-5))
    ref_grad = reference.q_topo.weight.grad
    checks.append(("fused-KL grad q_topo.weight vs fp64 reference", _max_err(fused.q_topo.weight.grad, ref_grad),
                   1e-4 * ref_grad.abs().max().item()))

    # The shield: an output-only loss must leave the topology stream untouched.
    fused.zero_grad()
    out, _ = fused(x.to(device), return_attn="head_mean")
    out.pow(2).mean().backward()
    # The shield gives the topology weights no gradient at all (None), as the reference does.
    leaked = max(0.0 if p.grad is None else p.grad.abs().max().item()
                 for p in (fused.q_topo.weight, fused.k_topo.weight))
    checks.append(("shield: output loss gives |dW_q|,|dW_k| = 0", leaked, 0.0))

    mode = "Triton interpreter on CPU" if os.environ.get("TRITON_INTERPRET") == "1" else str(device)
    log.info("Synergistic attention demo: B=%d, N=%d tokens, dim=%d, %d heads, fp32, %s", batch, tokens, dim,
             heads, mode)
    log.info("fused forward+backward with head-mean maps and topology loss: %.2f s", elapsed)
    ok = True
    for name, err, tol in checks:
        passed = err <= tol
        ok &= passed
        log.info("  [%s] %-55s max err %.2e (tol %.1e)", "PASS" if passed else "FAIL", name, err, tol)
    log.info("all checks passed" if ok else "SOME CHECKS FAILED")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Synergistic attention kernel demo")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="64 = the 8x8 latent grid of a 224px image")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        log.error("no GPU: run with TRITON_INTERPRET=1 (make demo sets it) to use the Triton interpreter")
        return 2
    return 0 if run(args.batch, args.tokens, args.dim, args.heads, device) else 1


if __name__ == "__main__":
    sys.exit(main())
