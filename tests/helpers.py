"""Shared test helpers: input layouts and the FlashAttention tolerance rule."""

from __future__ import annotations

import torch

# Absolute slack on top of twice the eager same-dtype error: a few units in the last place at the
# unit scale the tests use, so that an exactly-matching eager result (error 0) does not demand
# bit-identical kernels.
FLASH_RULE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}


def assert_flash_rule(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor,
                      dtype: torch.dtype) -> None:
    """max |ours − ref| ≤ 2 · max |torch-same-dtype − ref| + atol (the FlashAttention test rule)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours_err = (ours.double() - ref.double()).abs().max().item()
    eager_err = (same_dtype.double() - ref.double()).abs().max().item()
    bound = 2 * eager_err + FLASH_RULE_ATOL[dtype]
    assert ours_err <= bound, f"{name}: max|ours-ref|={ours_err:.3e} > 2*{eager_err:.3e}+atol={bound:.3e}"


def make_qkv(shape, dtype, device, layout: str = "contiguous", seed: int = 0):
    """q, k, v of ``shape`` (B, H, N, D) in one of three memory layouts:

    * ``contiguous``;
    * ``bnhd``: views of one packed (B, N, 3, H, D) projection output, as a model produces them;
    * ``sliced``: rows sliced out of a wider (B, H, N, 6·D) buffer (row stride 6·D).
    """
    bsz, heads, seq, dim = shape
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        base = torch.randn(3, bsz, heads, seq, dim, generator=gen).to(device=device, dtype=dtype)
        return [base[i].contiguous() for i in range(3)]
    if layout == "bnhd":
        packed = torch.randn(bsz, seq, 3, heads, dim, generator=gen).to(device=device, dtype=dtype)
        return [packed[:, :, i].transpose(1, 2) for i in range(3)]
    if layout == "sliced":
        wide = torch.randn(bsz, heads, seq, 6 * dim, generator=gen).to(device=device, dtype=dtype)
        return [wide[..., 2 * i * dim:(2 * i + 1) * dim] for i in range(3)]
    raise ValueError(f"unknown layout {layout!r}")


def make_teacher(bsz: int, seq: int, heads: int | None = None, dtype=torch.float32, device="cpu",
                 seed: int = 2) -> torch.Tensor:
    """Random teacher maps with exact zeros: rows are distributions, about a third of entries 0.

    (B, N, N), or (B, H, N, N) with ``heads``. Rows are renormalized after the cast, in fp32, so
    that low-precision teachers still sum to 1 up to their own rounding."""
    gen = torch.Generator().manual_seed(seed)
    shape = (bsz, seq, seq) if heads is None else (bsz, heads, seq, seq)
    probs = torch.softmax(2.0 * torch.randn(shape, generator=gen, dtype=torch.float64), dim=-1)
    if seq > 1:
        probs = torch.where(probs < 0.5 / seq, torch.zeros_like(probs), probs)
    probs = probs / probs.sum(-1, keepdim=True)
    return probs.to(device=device, dtype=dtype)


def run_within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread; fails the test if it is still running after
    ``seconds`` (a stuck data loader must fail a test, not hang the suite). Re-raises its exception."""
    import threading

    import pytest

    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread below
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s: it hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
