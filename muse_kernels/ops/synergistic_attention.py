"""Synergistic attention: softmax(scale·QKᵀ)·V that also returns its maps, with routed gradients.

Forward
  * ``_synergistic_attention_fwd_kernel`` streams key blocks flash-style (online softmax, exp2) and
    writes ``out`` and the row log-sum-exp (base 2); without V only the LSE, and with a teacher map
    also the per-head KL(t ‖ A) of every row (``topology_kl_loss.py`` drives these modes). One program per (batch·head, query block) on a
    1-D grid, so the number of (batch, head) pairs is not bounded by CUDA's 65535 limit on grid
    axes 1 and 2.
  * ``_synergistic_attention_maps_kernel`` writes normalized maps from the stored LSE, one program per
    (map, query block, key block). For head-mean maps a program loops over the heads and averages in
    registers: deterministic, no atomics, and the (B, H, N, N) tensor never exists.
  * ``_synergistic_attention_single_pass_kernel`` replaces both when maps are wanted and every key
    fits in one tile (MUSE path, fp16/bf16, no per-head teacher, N ≤ 256 at head dim 32/64, ≤ 128 at
    16: ``single_pass_key_tile``): out, LSE and maps come from one score tile per head; a head-mean
    program runs all heads of its query tile and writes the mean once.

Backward (two deterministic kernels, no atomics)
  * ``_synergistic_attention_bwd_dq_kernel`` (per query block) computes the row term
    Δ = rowsum(P ⊙ dP) and then dQ.
  * ``_synergistic_attention_bwd_dkdv_kernel`` (per key block) computes dV = Pᵀ·dO and dK.
  With the shield on, dP is only the maps' gradient (dO·Vᵀ is never formed); with it off, dP = dO·Vᵀ
  plus the maps' gradient. Head-mean map gradients are read with a zero head stride and weight 1/H.
  A per-head KL term adds (rowsum(t)·P − t) to dS in both kernels; dV is skipped without dO.

General attention (``GENERAL``, what transformers models need; unshielded, no teacher)
  * query and key lengths may differ (``N`` queries, ``N_K`` keys); grouped-query attention reads
    k/v head ``h // kv_group``, and the dK/dV kernel (one program per kv head and key block) sums
    over the group's query heads;
  * a causal mask, bottom-right aligned (query i sees keys j ≤ i + N_K − N, FlashAttention ≥ 2.1's
    convention and transformers' for queries at the end of a KV cache), given as ``causal_offset``
    (N_K − N; N_K for none). Key blocks no query of a block can see are skipped;
  * a 4-D attention mask broadcast over (batch, head, query, key) by zero strides: boolean
    (``MASK="bool"``, True = attend) or additive (``MASK="additive"``, fp32).
  Masked logits are set to a finite ``MASKED_LOGIT`` rather than −inf: a row whose keys are all
  masked then comes out uniform over all N_K keys, exactly as transformers' eager attention (whose
  masks add finfo.min, which absorbs the logits) defines it. Its LSE, MASKED_LOGIT + log2(N_K), is not
  representable and is stored as MASKED_LOGIT, so kernels that recompute P from the LSE scale such
  rows by 1/N_K. ``GENERAL=False`` (MUSE: self-attention, no mask) compiles to the code it had before
  these features existed.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_ = tl.constexpr(LOG2E)
# Far below any real logit (log2 units) and large enough that adding a logit leaves it unchanged.
MASKED_LOGIT = tl.constexpr(-1.0e30)
# The same in natural units: additive mask values at or below it mask their entry.
ADDITIVE_MASKED = tl.constexpr(-1.0e30 * LN2.value)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MASK_KINDS = ("none", "bool", "additive")
# Scalars only the general path reads. Never specialized on their values (Triton would turn a 1 into a
# constant), so the compiled variants are exactly the ones `muse_kernels.aot` compiles.
GENERAL_SCALARS = ("N_K", "kv_group", "causal_offset")


@triton.jit
def _apply_masks(s, q_idx, k_idx, in_bounds, causal_offset, mask_base, stride_mm, stride_mn,
                 MASK: tl.constexpr):
    """Logits ``s`` (log2 units) with the causal and attention masks applied. ``q_idx``, ``k_idx`` are
    broadcastable index tensors (a row and a column vector, in either orientation), so the same code
    serves the (query, key) tiles and the transposed tiles of the dK/dV kernel. Entries outside the
    tensors are masked too: with a fully masked row's LSE (MASKED_LOGIT) any real logit there would
    overflow exp2."""
    visible = (k_idx <= q_idx + causal_offset) & in_bounds
    mask_ptrs = mask_base + q_idx.to(tl.int64) * stride_mm + k_idx.to(tl.int64) * stride_mn
    if MASK == "bool":
        allowed = tl.load(mask_ptrs, mask=in_bounds, other=0)
        visible = visible & (allowed != 0)
    if MASK == "additive":
        bias = tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        # Values this low (finfo.min, −inf) mask the entry; clamped first, as finfo.min·log2(e) overflows.
        visible = visible & (bias > ADDITIVE_MASKED)
        s = s + tl.maximum(bias, ADDITIVE_MASKED) * LOG2E_
    return tl.where(visible, s, MASKED_LOGIT)


@triton.jit
def _fully_masked_scale(lse, n_keys):
    """1/N_K for rows whose every key is masked (their P is uniform, see the module docstring), else 1."""
    return tl.where(lse < 0.5 * MASKED_LOGIT, 1.0 / n_keys, 1.0)


@triton.jit
def _key_range_end(m_block, N_K, causal_offset, BLOCK_M: tl.constexpr, MASK: tl.constexpr):
    """End of the key range a query block can see: the causal diagonal, or every key when the block
    may hold fully masked rows (which attend uniformly to all keys) or an attention mask applies."""
    hi = tl.minimum(N_K, (m_block + 1) * BLOCK_M + causal_offset)
    if MASK != "none":
        hi = N_K
    return tl.where(m_block * BLOCK_M + causal_offset < 0, N_K, hi)


@triton.jit(do_not_specialize=GENERAL_SCALARS)
def _synergistic_attention_fwd_kernel(
    Q, K, V, Out, Lse, Teacher, RowLoss, Mask,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, N_K, kv_group, causal_offset, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_V: tl.constexpr, TEACHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GENERAL: tl.constexpr, MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m_blocks
    m_block = pid % num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if GENERAL:
        h_kv = h // kv_group
        n_keys = N_K
        key_end = _key_range_end(m_block, N_K, causal_offset, BLOCK_M, MASK)
    else:
        h_kv = h
        n_keys = N
        key_end = N

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    t_base = Teacher + b * stride_tb + h * stride_th + offs_m[:, None].to(tl.int64) * stride_tm
    mask_base = Mask + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Per-row KL(t ‖ A) = Σ t·log t − Σ t·S + LSE·Σ t needs only three running sums, none of which
    # depends on the running max: the loss costs no second pass and no map in memory.
    t_logt = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_keys
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale_log2
        if TEACHER:
            t = tl.load(t_base + cols[None, :].to(tl.int64) * stride_tn,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            # s is finite on padded columns (their keys load as 0) and t is 0 there.
            t_s += tl.sum(t * s, 1)
            t_logt += tl.sum(t * tl.log(tl.where(t > 0, t, 1.0)), 1)
            t_sum += tl.sum(t, 1)
        if GENERAL:
            s = _apply_masks(s, offs_m[:, None], cols[None, :], row_ok[:, None] & col_ok[None, :], causal_offset,
                             mask_base, stride_mm, stride_mn, MASK)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # Column 0 is valid in the first block, so m_new is finite from the first iteration on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    lse2 = m_i + tl.log2(l_i)
    tl.store(Lse + bh.to(tl.int64) * N + offs_m, lse2, mask=row_ok)
    if HAS_V:
        acc = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                 acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if TEACHER:
        # s and lse2 are in log2 units; the loss is in nats.
        row_loss = t_logt + LN2 * (t_sum * lse2 - t_s)
        tl.store(RowLoss + bh.to(tl.int64) * N + offs_m, row_loss, mask=row_ok)


@triton.jit
def _head_mean_loss_tail(Teacher, mean, b, offs_m, offs_n, tile_ok, stride_tb, stride_tm, eps):
    """The official head-mean topology loss on a tile of s̄ (still in registers): the row sums of
    t·log t − t·log(s̄ + eps) over the tile's keys, and the loss's map gradient −t / (s̄ + eps), as the
    composed loss computes them (xlogy(t, t): 0 where t = 0); padded keys add nothing."""
    t = tl.load(Teacher + b * stride_tb + offs_m[:, None] * stride_tm + offs_n[None, :],
                mask=tile_ok, other=0.0).to(tl.float32)
    denom = mean + eps
    terms = t * tl.log(tl.where(t == 0.0, 1.0, t)) - t * tl.log(denom)
    return tl.sum(tl.where(tile_ok, terms, 0.0), 1), -t / denom


@triton.jit(do_not_specialize=GENERAL_SCALARS)
def _synergistic_attention_maps_kernel(
    Q, K, Lse, Attn, Mask, Teacher, RowLoss,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ab, stride_ah, stride_am, stride_an,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_tm,
    H, N, N_K, kv_group, causal_offset, qk_scale_log2, eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_MEAN: tl.constexpr, TEACHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GENERAL: tl.constexpr, MASK: tl.constexpr,
):
    """TEACHER (head-mean, MUSE path): the head-mean loss's tail on the tile (``_head_mean_loss_tail``):
    Attn gets the map gradient, RowLoss (B, N, key blocks) each key block's share of the row terms."""
    if GENERAL:
        n_keys = N_K
    else:
        n_keys = N
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    num_n_blocks = tl.cdiv(n_keys, BLOCK_N)
    tiles = num_m_blocks * num_n_blocks
    map_idx = pid // tiles
    tile = pid % tiles
    m_block = tile // num_n_blocks
    n_block = tile % num_n_blocks
    if HEAD_MEAN:
        b = map_idx.to(tl.int64)
        h_first = 0
        num_heads = H
    else:
        b = (map_idx // H).to(tl.int64)
        h_first = map_idx % H
        num_heads = 1

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    col_ok = offs_n < n_keys

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h_step in range(0, num_heads):
        h = (h_first + h_step).to(tl.int64)
        if GENERAL:
            h_kv = h // kv_group
        else:
            h_kv = h
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_t = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
                      mask=col_ok[None, :], other=0.0)
        lse = tl.load(Lse + (b * H + h) * N + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale_log2
        if GENERAL:
            s = _apply_masks(s, offs_m[:, None], offs_n[None, :], row_ok[:, None] & col_ok[None, :], causal_offset,
                             Mask + b * stride_mb + h * stride_mh, stride_mm, stride_mn, MASK)
            acc += tl.exp2(s - lse[:, None]) * _fully_masked_scale(lse, n_keys)[:, None]
        else:
            acc += tl.exp2(s - lse[:, None])
    if HEAD_MEAN:
        acc = acc / H
        h_out = 0
    else:
        h_out = h_first.to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if TEACHER:
        row_terms, acc = _head_mean_loss_tail(Teacher, acc, b, offs_m, offs_n, tile_ok, stride_tb, stride_tm, eps)
        tl.store(RowLoss + (b * N + offs_m) * num_n_blocks + n_block, row_terms, mask=row_ok)
    a_ptrs = (Attn + b * stride_ab + h_out * stride_ah
              + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :].to(tl.int64) * stride_an)
    tl.store(a_ptrs, acc.to(Attn.dtype.element_ty), mask=tile_ok)


@triton.jit
def _single_pass_head(
    Q, K, V, Out, Lse, b, h, offs_m, offs_k, offs_d, row_ok, col_ok,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, qk_scale_log2, HAS_V: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One head of a query tile against all its keys: stores the output and the LSE, returns the
    normalized map tile (BLOCK_M, BLOCK_KEYS), zero on padded keys."""
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_t = tl.load(K + b * stride_kb + h * stride_kh + offs_k[None, :] * stride_kn + offs_d[:, None],
                  mask=col_ok[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale_log2
    s = tl.where(col_ok[None, :], s, float("-inf"))
    # The whole row is in the tile: its max and sum are exact, no running rescale.
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    inv_l = 1.0 / l
    tl.store(Lse + (b * H + h) * N + offs_m, m + tl.log2(l), mask=row_ok)
    if HAS_V:
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_k[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        o = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION) * inv_l[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                 o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    return p * inv_l[:, None]


@triton.jit
def _synergistic_attention_single_pass_kernel(
    Q, K, V, Out, Lse, Attn, Teacher, RowLoss,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_tb, stride_tm,
    H, N, qk_scale_log2, eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    HEAD_MEAN: tl.constexpr, HAS_V: tl.constexpr, TEACHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Output, LSE and normalized maps of MUSE's self-attention when every key fits in one tile
    (N ≤ BLOCK_KEYS): one Q·Kᵀ per head, the maps written straight from the score tile. Per-head maps:
    one program per (batch·head, query block). Head-mean maps: one program per (batch, query block)
    runs every head and writes the (B, N, N) mean once, accumulated in registers. The maps are the
    launcher's own contiguous tensors, so their strides are not arguments: the compiler knows the rows
    are contiguous.

    TEACHER (head-mean only): the official topology loss's tail runs on the mean still in registers,
    so s̄ never goes to memory. RowLoss (B, N) gets Σ_j t·log t − t·log(s̄ + eps) and Attn, in place
    of s̄, the loss's map gradient −t / (s̄ + eps), which the backward reads, times the upstream
    gradient and 1 / (B·N) (``dattn_kl_scale``)."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    map_idx = pid // num_m_blocks
    m_block = pid % num_m_blocks
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_KEYS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    col_ok = offs_k < N
    # Offsets within one map fit in 32 bits (N ≤ BLOCK_KEYS ≤ 256); 64-bit ones cost two registers each.
    a_offsets = offs_m[:, None] * N + offs_k[None, :]
    if HEAD_MEAN:
        b = map_idx.to(tl.int64)
        mean = tl.zeros([BLOCK_M, BLOCK_KEYS], dtype=tl.float32)
        for h in range(0, H):
            mean += _single_pass_head(
                Q, K, V, Out, Lse, b, tl.cast(h, tl.int64), offs_m, offs_k, offs_d, row_ok, col_ok,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                H, N, qk_scale_log2, HAS_V, INPUT_PRECISION)
        mean = mean / H
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if TEACHER:
            row_terms, map_grad = _head_mean_loss_tail(Teacher, mean, b, offs_m, offs_k, tile_ok, stride_tb,
                                                       stride_tm, eps)
            tl.store(RowLoss + b * N + offs_m, row_terms, mask=row_ok)
            tl.store(Attn + b * N * N + a_offsets, map_grad, mask=tile_ok)
        else:
            tl.store(Attn + b * N * N + a_offsets, mean.to(Attn.dtype.element_ty), mask=tile_ok)
    else:
        b = (map_idx // H).to(tl.int64)
        h = (map_idx % H).to(tl.int64)
        attn = _single_pass_head(
            Q, K, V, Out, Lse, b, h, offs_m, offs_k, offs_d, row_ok, col_ok,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
            H, N, qk_scale_log2, HAS_V, INPUT_PRECISION)
        tl.store(Attn + map_idx.to(tl.int64) * N * N + a_offsets, attn.to(Attn.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _map_grad_weight(KlGrad, attn_grad_weight, dattn_kl_scale):
    """The map gradient's weight: 1/H for head-mean maps, and, for the fused head-mean loss's map
    gradient (``dattn_kl_scale`` ≠ 0), the loss's upstream gradient (read on the device: no host sync)
    times 1/(B·N)."""
    weight = attn_grad_weight
    if dattn_kl_scale != 0.0:
        weight = attn_grad_weight * dattn_kl_scale * tl.load(KlGrad).to(tl.float32)
    return weight


@triton.jit(do_not_specialize=GENERAL_SCALARS)
def _synergistic_attention_bwd_dq_kernel(
    Q, K, V, Out, dOut, dAttn, Teacher, TeacherRowSum, KlGrad, Lse, Delta, dQ, Mask,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dab, stride_dah, stride_dam, stride_dan,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_rb, stride_rh, stride_rm,
    stride_dqb, stride_dqh, stride_dqn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, N_K, kv_group, causal_offset, qk_scale_log2, sm_scale, attn_grad_weight, kl_scale, dattn_kl_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    OUT_TO_QK: tl.constexpr, HAS_DATTN: tl.constexpr, TEACHER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GENERAL: tl.constexpr, MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m_blocks
    m_block = pid % num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if GENERAL:
        h_kv = h // kv_group
        n_keys = N_K
        key_end = _key_range_end(m_block, N_K, causal_offset, BLOCK_M, MASK)
    else:
        h_kv = h
        n_keys = N
        key_end = N

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    if GENERAL:
        row_scale = _fully_masked_scale(lse, n_keys)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    da_base = dAttn + b * stride_dab + h * stride_dah + offs_m[:, None].to(tl.int64) * stride_dam
    t_base = Teacher + b * stride_tb + h * stride_th + offs_m[:, None].to(tl.int64) * stride_tm
    mask_base = Mask + b * stride_mb + h * stride_mh
    if HAS_DATTN:
        da_weight = _map_grad_weight(KlGrad, attn_grad_weight, dattn_kl_scale)
    if TEACHER:
        # dKL/dS = (Σ_j t)·A − t per row, times the upstream gradient and the mean's 1/count.
        kl_weight = tl.load(KlGrad).to(tl.float32) * kl_scale
        t_rowsum = tl.load(TeacherRowSum + b * stride_rb + h * stride_rh + offs_m * stride_rm,
                           mask=row_ok, other=0.0)

    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if OUT_TO_QK:
        # rowsum(P ⊙ dO·Vᵀ) = rowsum(dO ⊙ O): the output path's share of Δ without a pass over keys.
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(dOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                     + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DATTN:
        for start_n in range(0, key_end, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < n_keys
            k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale_log2
            if GENERAL:
                s = _apply_masks(s, offs_m[:, None], cols[None, :], row_ok[:, None] & col_ok[None, :],
                                 causal_offset, mask_base, stride_mm, stride_mn, MASK)
                p = tl.exp2(s - lse[:, None]) * row_scale[:, None]
            else:
                p = tl.exp2(s - lse[:, None])
            da = tl.load(da_base + cols[None, :].to(tl.int64) * stride_dan,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            delta += tl.sum(p * (da.to(tl.float32) * da_weight), 1)
    tl.store(Delta + bh.to(tl.int64) * N + offs_m, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_keys
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale_log2
        if GENERAL:
            s = _apply_masks(s, offs_m[:, None], cols[None, :], row_ok[:, None] & col_ok[None, :], causal_offset,
                             mask_base, stride_mm, stride_mn, MASK)
            p = tl.exp2(s - lse[:, None]) * row_scale[:, None]
        else:
            p = tl.exp2(s - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if OUT_TO_QK or HAS_DATTN:
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if OUT_TO_QK:
                v_t = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None], mask=col_ok[None, :],
                              other=0.0)
                dp = tl.dot(do.to(v_t.dtype), v_t, dp, input_precision=INPUT_PRECISION)
            if HAS_DATTN:
                da = tl.load(da_base + cols[None, :].to(tl.int64) * stride_dan,
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                dp += da.to(tl.float32) * da_weight
            ds = p * (dp - delta[:, None])
        if TEACHER:
            t = tl.load(t_base + cols[None, :].to(tl.int64) * stride_tn,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            ds += kl_weight * (t_rowsum[:, None] * p - t)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=INPUT_PRECISION)
    tl.store(dQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=GENERAL_SCALARS)
def _synergistic_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, dAttn, Teacher, TeacherRowSum, KlGrad, Lse, Delta, dK, dV, Mask,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dab, stride_dah, stride_dam, stride_dan,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_rb, stride_rh, stride_rm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, N_K, kv_group, causal_offset, qk_scale_log2, sm_scale, attn_grad_weight, kl_scale, dattn_kl_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    OUT_TO_QK: tl.constexpr, HAS_DATTN: tl.constexpr, TEACHER: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GENERAL: tl.constexpr, MASK: tl.constexpr,
):
    if GENERAL:
        n_keys = N_K
        kv_heads = H // kv_group
        group_size = kv_group
    else:
        n_keys = N
        kv_heads = H
        group_size = 1
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(n_keys, BLOCK_N)
    bh_kv = pid // num_n_blocks
    n_block = pid % num_n_blocks
    b = (bh_kv // kv_heads).to(tl.int64)
    h_kv = (bh_kv % kv_heads).to(tl.int64)
    if GENERAL:
        # The first query that can see this key block (causal), or every query when some rows are
        # fully masked (they attend uniformly to all keys) or an attention mask applies.
        query_start = tl.maximum(n_block * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
        if MASK != "none":
            query_start = 0
        query_start = tl.where(causal_offset < 0, 0, query_start)
    else:
        query_start = 0

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < n_keys

    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    if OUT_TO_QK:
        v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
    if HAS_DATTN:
        da_weight = _map_grad_weight(KlGrad, attn_grad_weight, dattn_kl_scale)
    if TEACHER:
        kl_weight = tl.load(KlGrad).to(tl.float32) * kl_scale

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Grouped-query attention: the kv head's gradients sum over the query heads that share it.
    for g in range(0, group_size):
        h = h_kv * group_size + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dOut + b * stride_dob + h * stride_doh
        da_base = dAttn + b * stride_dab + h * stride_dah + offs_n[:, None].to(tl.int64) * stride_dan
        t_base = Teacher + b * stride_tb + h * stride_th + offs_n[:, None].to(tl.int64) * stride_tn
        mask_base = Mask + b * stride_mb + h * stride_mh
        if GENERAL:
            stat_base = (b * H + h) * N
        else:
            stat_base = bh_kv.to(tl.int64) * N
        for start_m in range(query_start, N, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < N
            q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            # +inf for padded query rows makes their probabilities exactly 0.
            lse = tl.load(Lse + stat_base + rows, mask=row_ok, other=float("inf"))
            s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale_log2
            if GENERAL:
                s_t = _apply_masks(s_t, rows[None, :], offs_n[:, None], col_ok[:, None] & row_ok[None, :],
                                   causal_offset, mask_base, stride_mm, stride_mn, MASK)
                p_t = tl.exp2(s_t - lse[None, :]) * _fully_masked_scale(lse, n_keys)[None, :]
            else:
                p_t = tl.exp2(s_t - lse[None, :])
            if COMPUTE_DV or OUT_TO_QK:
                do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                             mask=row_ok[:, None], other=0.0)
            if COMPUTE_DV:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            if COMPUTE_DK:
                ds_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                if OUT_TO_QK or HAS_DATTN:
                    dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                    if OUT_TO_QK:
                        dp_t = tl.dot(v, tl.trans(do.to(v.dtype)), dp_t, input_precision=INPUT_PRECISION)
                    if HAS_DATTN:
                        da_t = tl.load(da_base + rows[None, :].to(tl.int64) * stride_dam,
                                       mask=col_ok[:, None] & row_ok[None, :], other=0.0)
                        dp_t += da_t.to(tl.float32) * da_weight
                    delta = tl.load(Delta + stat_base + rows, mask=row_ok, other=0.0)
                    ds_t = p_t * (dp_t - delta[None, :])
                if TEACHER:
                    t_t = tl.load(t_base + rows[None, :].to(tl.int64) * stride_tm,
                                  mask=col_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
                    t_rowsum = tl.load(TeacherRowSum + b * stride_rb + h * stride_rh + rows * stride_rm,
                                       mask=row_ok, other=0.0)
                    ds_t += kl_weight * (t_rowsum[None, :] * p_t - t_t)
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)

    if COMPUTE_DK:
        tl.store(dK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
                 (dk * sm_scale).to(dK.dtype.element_ty), mask=col_ok[:, None])
    if COMPUTE_DV:
        tl.store(dV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
                 dv.to(dV.dtype.element_ty), mask=col_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Launch configurations. Fixed per (kernel, head dim, dtype) rather than autotuned, so that every
# configuration that can run is known, compiled ahead of time for sm_80 / sm_90 by `muse_kernels.aot`
# and checked against the shared-memory limit in the tests.


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


LAUNCH_TABLE_PATH = Path(__file__).with_name("launch_configs.json")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.cache
def launch_table() -> dict[tuple[str, str, int, str], tuple[tuple[float, LaunchConfig], ...]]:
    """The committed launch configurations (``launch_configs.json``): (kernel, variant, head dim, dtype)
    → ((max_seq, config), ...) in max_seq order, any-N entries (max_seq null) last as infinity."""
    table = {}
    for entry in json.loads(LAUNCH_TABLE_PATH.read_text())["entries"]:
        key = (entry["kernel"], entry["variant"], entry["head_dim"], entry["dtype"])
        max_seq = math.inf if entry["max_seq"] is None else entry["max_seq"]
        config = LaunchConfig(entry["block_m"], entry["block_n"], entry["num_warps"], entry["num_stages"])
        table.setdefault(key, []).append((max_seq, config))
    return {key: tuple(sorted(rows, key=lambda row: row[0])) for key, rows in table.items()}


def _table_rows(kernel: str, head_dim: int, dtype: torch.dtype, variant: str) -> tuple[tuple[float, LaunchConfig], ...]:
    return launch_table().get((kernel, variant, head_dim, _DTYPE_NAMES[dtype]), ())


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype, seq: int, variant: str = "") -> LaunchConfig:
    """The table's configuration for a launch over ``seq`` keys (the smallest bucket that holds it)."""
    rows = _table_rows(kernel, head_dim, dtype, variant)
    config = next((config for max_seq, config in rows if seq <= max_seq), None)
    if config is None:
        raise LookupError(f"no launch configuration for kernel={kernel!r} variant={variant!r} head_dim={head_dim} "
                          f"dtype={dtype} N={seq} in {LAUNCH_TABLE_PATH}")
    return config


def table_configs(kernel: str, head_dim: int, dtype: torch.dtype, variant: str = "") -> tuple[LaunchConfig, ...]:
    """Every configuration the table holds for these launches, over all N buckets (what AOT compiles)."""
    return tuple(dict.fromkeys(config for _, config in _table_rows(kernel, head_dim, dtype, variant)))


def fwd_config(head_dim: int, dtype: torch.dtype, seq: int) -> LaunchConfig:
    return launch_config("fwd", head_dim, dtype, seq)


def maps_config(head_dim: int, dtype: torch.dtype, seq: int) -> LaunchConfig:
    return launch_config("maps", head_dim, dtype, seq)


def bwd_config(head_dim: int, dtype: torch.dtype, seq: int) -> LaunchConfig:
    return launch_config("bwd", head_dim, dtype, seq)


# The single-pass forward keeps a whole key row in one tile (BLOCK_KEYS = the smallest tile ≥ N), per
# head dim. At D = 128, K and V of 256 keys beside the score tile leave too little room; at D = 16 the
# 256-key head-mean tile spilled in every launch config tried (muse_kernels.aot). Larger N, those head
# dims and fp32 inputs take the two-kernel path (flash forward + maps kernel).
SINGLE_PASS_KEY_TILES = {16: (64, 128), 32: (64, 128, 256), 64: (64, 128, 256)}
SINGLE_PASS_DTYPES = (torch.float16, torch.bfloat16)
# The fused head-mean loss (``head_mean_kl_forward``): at head dim 16 the 128-key tile spilled in every
# launch config tried (4-16 warps, 16-128 query rows) once the loss tail sits beside V's output.
SINGLE_PASS_LOSS_KEY_TILES = {16: (64,), 32: (64, 128, 256), 64: (64, 128, 256)}


def single_pass_key_tile(seq: int, head_dim: int, dtype: torch.dtype) -> int | None:
    """The key tile of the single-pass forward for ``seq`` keys, None where the two-kernel path runs.
    fp32 inputs stay on the two-kernel path: their tf32 operands double the register footprint and
    every single-pass tile spilled (up to 2.9 KB per thread at D = 64, ``muse_kernels.aot``)."""
    if dtype not in SINGLE_PASS_DTYPES:
        return None
    return next((tile for tile in SINGLE_PASS_KEY_TILES.get(head_dim, ()) if seq <= tile), None)


def single_pass_config(key_tile: int, head_dim: int, dtype: torch.dtype, head_mean: bool,
                       teacher: bool = False) -> LaunchConfig:
    """``block_n`` is the key tile. The table's entries were chosen so that no aligned configuration
    spills on sm_80 / sm_90 (``muse_kernels.aot`` reports registers and local memory); not yet timed on
    a GPU. Head-mean maps hold a second (running-mean) tile, hence the smaller query tiles; the fused
    loss (``teacher``) runs on the finished mean, after the per-head tiles are dead."""
    variant = "head_mean_loss" if teacher else ("head_mean" if head_mean else "per_head")
    return launch_config("single_pass", head_dim, dtype, key_tile, variant)


def _input_precision(dtype: torch.dtype) -> str:
    # Triton's tl.dot rounds fp32 operands to TF32 by default; honour PyTorch's switch instead.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr function: calling it from the host costs microseconds per launch.
    return -(-a // b)


def _bhn_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride()[:3]


def _teacher_strides(teacher: torch.Tensor | None) -> tuple[int, int]:
    """(batch, query) strides of a (B, N, N) teacher with contiguous rows; zeros without one."""
    return (0, 0) if teacher is None else teacher.stride()[:2]


def _map_strides(x: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(batch, head, query, key) strides of a (B, H, N, N) tensor; a (B, N, N) tensor is shared by all
    heads (head stride 0). None gives zeros: the kernel never reads it."""
    if x is None:
        return 0, 0, 0, 0
    if x.dim() == 4:
        return x.stride(0), x.stride(1), x.stride(2), x.stride(3)
    return x.stride(0), 0, x.stride(1), x.stride(2)


def _row_strides(x: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N) tensor; (B, N) is shared by all heads."""
    if x is None:
        return 0, 0, 0
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.stride(2)
    return x.stride(0), 0, x.stride(1)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output_like(v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) output stored as (B, N, H, D), so that merging heads afterwards is a free view."""
    return new_output(v, v)


def new_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of q's heads and queries with v's head dim, laid out as ``new_output_like``."""
    bsz, heads, seq, _ = q.shape
    dim = v.shape[-1]
    return torch.empty_strided((bsz, heads, seq, dim), (seq * heads * dim, dim, heads * dim, 1),
                               dtype=v.dtype, device=v.device)


def is_general(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool) -> bool:
    """Whether a call needs the general kernels (anything but MUSE's unmasked self-attention)."""
    return attn_mask is not None or causal or k.shape[1] != q.shape[1] or k.shape[2] != q.shape[2]


@dataclass(frozen=True)
class GeneralArgs:
    """The general path's kernel arguments (``GENERAL`` in the kernels' docstring)."""

    enabled: bool
    n_keys: int
    kv_group: int
    causal_offset: int
    mask: torch.Tensor | None
    mask_kind: str
    mask_strides: tuple[int, int, int, int]


# MUSE's self-attention: the GENERAL=False kernels never read these values (muse_kernels.aot checks).
_MUSE_ARGS = GeneralArgs(False, 0, 1, 0, None, "none", (0, 0, 0, 0))


def general_args(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 causal: bool = False) -> GeneralArgs:
    """``attn_mask`` broadcastable to (B, H, N_q, N_k), bool (True = attend) or floating (additive)."""
    if not is_general(q, k, attn_mask, causal):
        return _MUSE_ARGS
    bsz, heads, seq, _ = q.shape
    n_keys = k.shape[2]
    mask, kind = None, "none"
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # Same bytes, a pointer type the kernels load without Triton's i1 handling.
            mask, kind = attn_mask.view(torch.uint8), "bool"
        else:
            # One compiled variant for every float mask; transformers passes bool masks (see
            # muse_kernels.integrations.transformers), so only users' own float masks are converted.
            mask, kind = attn_mask.to(torch.float32), "additive"
        # Broadcast dims get stride 0: a (B, 1, N_q, N_k) mask is read once per head, never copied.
        mask = mask.expand(bsz, heads, seq, n_keys)
    # Bottom-right aligned causal mask: query i sees key j iff j ≤ i + (N_k − N_q); N_k: every key.
    causal_offset = n_keys - seq if causal else n_keys
    strides = (0, 0, 0, 0) if mask is None else tuple(mask.stride())
    return GeneralArgs(True, n_keys, heads // k.shape[1], causal_offset, mask, kind, strides)


def synergistic_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float,
    map_mode: str = "none", attn_dtype: torch.dtype = torch.float32, teacher: torch.Tensor | None = None,
    *, attn_mask: torch.Tensor | None = None, causal: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Returns (out, attn, lse2, row_kl).

    ``out`` is None without ``v`` (only the LSE and the loss are wanted); ``attn`` is None when
    ``map_mode == "none"``; ``row_kl`` (B, H, N) holds KL(teacher row ‖ A row) when a teacher
    ((B, N, N) shared by the heads, or (B, H, N, N)) is given, else None. q is (B, H, N_q, D); k, v
    are (B, H_kv, N_k, D) with H a multiple of H_kv; ``attn_mask`` and ``causal`` as in
    ``general_args`` (the general path takes no teacher).
    """
    bsz, heads, seq, dim = q.shape
    gen = general_args(q, k, attn_mask, causal)
    out = None if v is None else (new_output(q, v) if gen.enabled else new_output_like(v))
    lse = torch.empty(bsz, heads, seq, device=q.device, dtype=torch.float32)
    key_tile = None if map_mode == "none" or gen.enabled or teacher is not None else single_pass_key_tile(seq, dim, q.dtype)
    if key_tile is not None:
        out, attn, _ = _single_pass_forward(q, k, v, out, lse, scale, map_mode, attn_dtype, key_tile)
        return out, attn, lse, None
    row_kl = None if teacher is None else torch.empty_like(lse)
    precision = _input_precision(q.dtype)
    qk_scale_log2 = scale * LOG2E
    mask = lse if gen.mask is None else gen.mask
    general_scalars = (gen.n_keys, gen.kv_group, gen.causal_offset)

    cfg = fwd_config(dim, q.dtype, k.shape[2])
    grid = (bsz * heads * _cdiv(seq, cfg.block_m),)
    # Absent tensors are passed as lse, a valid pointer the kernel never dereferences for them.
    _synergistic_attention_fwd_kernel[grid](
        q, k, lse if v is None else v, lse if out is None else out, lse,
        lse if teacher is None else teacher, lse if row_kl is None else row_kl, mask,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(k if v is None else v),
        *_bhn_strides(k if out is None else out), *_map_strides(teacher), *gen.mask_strides,
        heads, seq, *general_scalars, qk_scale_log2,
        HEAD_DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_V=v is not None,
        TEACHER=teacher is not None, INPUT_PRECISION=precision, GENERAL=gen.enabled, MASK=gen.mask_kind,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    if map_mode == "none":
        return out, None, lse, row_kl
    attn, _ = _maps_forward(q, k, lse, scale, map_mode, attn_dtype, gen)
    return out, attn, lse, row_kl


def _maps_forward(q, k, lse, scale, map_mode, attn_dtype, gen, teacher=None, eps=0.0):
    """(maps, row_loss or None) from ``_synergistic_attention_maps_kernel`` and the stored LSE. With a
    (B, N, N) ``teacher`` (head-mean maps), the maps are the loss's map gradient and row_loss
    (B, N, key blocks) holds each key block's share of the row terms."""
    bsz, heads, seq, dim = q.shape
    head_mean = map_mode == "head_mean"
    n_keys = k.shape[2]
    map_shape = (bsz, seq, n_keys) if head_mean else (bsz, heads, seq, n_keys)
    attn = torch.empty(map_shape, device=q.device, dtype=attn_dtype)
    cfg = maps_config(dim, q.dtype, n_keys)
    key_blocks = _cdiv(n_keys, cfg.block_n)
    row_loss = None if teacher is None else torch.empty(bsz, seq, key_blocks, device=q.device, dtype=torch.float32)
    num_maps = bsz if head_mean else bsz * heads
    grid = (num_maps * _cdiv(seq, cfg.block_m) * key_blocks,)
    _synergistic_attention_maps_kernel[grid](
        q, k, lse, attn, lse if gen.mask is None else gen.mask,
        lse if teacher is None else teacher, lse if row_loss is None else row_loss,
        *_bhn_strides(q), *_bhn_strides(k), *_map_strides(attn), *gen.mask_strides,
        *_teacher_strides(teacher),
        heads, seq, gen.n_keys, gen.kv_group, gen.causal_offset, scale * LOG2E, eps,
        HEAD_DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_MEAN=head_mean,
        TEACHER=teacher is not None, INPUT_PRECISION=_input_precision(q.dtype), GENERAL=gen.enabled,
        MASK=gen.mask_kind, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return attn, row_loss


def _single_pass_forward(q, k, v, out, lse, scale, map_mode, attn_dtype, key_tile, teacher=None, eps=0.0):
    """(out, attn, row_loss or None) from ``_synergistic_attention_single_pass_kernel``; fills ``out``
    and ``lse``. With a (B, N, N) ``teacher`` (head-mean maps), ``attn`` is the loss's map gradient."""
    bsz, heads, seq, dim = q.shape
    head_mean = map_mode == "head_mean"
    attn = torch.empty((bsz, seq, seq) if head_mean else (bsz, heads, seq, seq), device=q.device, dtype=attn_dtype)
    row_loss = None if teacher is None else torch.empty(bsz, seq, device=q.device, dtype=torch.float32)
    cfg = single_pass_config(key_tile, dim, q.dtype, head_mean, teacher is not None)
    grid = ((bsz if head_mean else bsz * heads) * _cdiv(seq, cfg.block_m),)
    # Absent tensors are passed as lse, a valid pointer the kernel never dereferences.
    _synergistic_attention_single_pass_kernel[grid](
        q, k, lse if v is None else v, lse if out is None else out, lse, attn,
        lse if teacher is None else teacher, lse if row_loss is None else row_loss,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(k if v is None else v),
        *_bhn_strides(k if out is None else out), *_teacher_strides(teacher),
        heads, seq, scale * LOG2E, eps,
        HEAD_DIM=dim, BLOCK_M=cfg.block_m, BLOCK_KEYS=key_tile, HEAD_MEAN=head_mean, HAS_V=v is not None,
        TEACHER=teacher is not None, INPUT_PRECISION=_input_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, attn, row_loss


def head_mean_kl_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, teacher: torch.Tensor, scale: float, eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official (head-mean) topology loss with s̄ kept in registers: (out or None, loss, lse2, map
    gradient −t / (s̄ + eps), fp32 (B, N, N)). Where every key fits in one tile (``single_pass_key_tile``,
    ``SINGLE_PASS_LOSS_KEY_TILES``) one kernel does it all; elsewhere the flash forward (out, LSE) and
    the maps kernel with the loss tail."""
    bsz, heads, seq, dim = q.shape
    key_tile = single_pass_key_tile(seq, dim, q.dtype)
    if key_tile in SINGLE_PASS_LOSS_KEY_TILES.get(dim, ()):
        out = None if v is None else new_output_like(v)
        lse = torch.empty(bsz, heads, seq, device=q.device, dtype=torch.float32)
        out, map_grad, row_loss = _single_pass_forward(q, k, v, out, lse, scale, "head_mean", torch.float32,
                                                       key_tile, teacher, eps)
        return out, row_loss.mean(), lse, map_grad
    out, _, lse, _ = synergistic_attention_forward(q, k, v, scale)
    map_grad, row_loss = _maps_forward(q, k, lse, scale, "head_mean", torch.float32, _MUSE_ARGS, teacher, eps)
    return out, row_loss.sum(-1).mean(), lse, map_grad


def synergistic_attention_backward(
    grad_out: torch.Tensor | None,
    grad_attn: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor,
    scale: float, shield: bool = True,
    teacher: torch.Tensor | None = None, kl_grad: torch.Tensor | None = None, kl_scale: float = 0.0,
    *, dattn_kl_scale: float = 0.0, attn_mask: torch.Tensor | None = None, causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv) of the attention outputs and, optionally, of a per-head KL term.

    ``grad_attn`` is (B, H, N, N) for per-head maps or (B, N, N) for head-mean maps (each head then
    receives 1/H of it). With ``teacher``, the per-head KL's gradient ``kl_grad · kl_scale ·
    (rowsum(t)·A − t)`` (``kl_grad`` a 0-dim tensor, read on the device: no host sync) is added to
    the logits' gradient. Without a teacher, a nonzero ``dattn_kl_scale`` scales ``grad_attn`` by
    ``kl_grad · dattn_kl_scale`` (the fused head-mean loss's map gradient, ``head_mean_kl_forward``).
    dv is None without ``v``, zero when ``grad_out`` is None. The general path
    (``attn_mask``, ``causal``, GQA, N_q ≠ N_k) is unshielded and takes no teacher.
    """
    bsz, heads, seq, dim = q.shape
    if dattn_kl_scale != 0.0 and (grad_attn is None or kl_grad is None or teacher is not None):
        raise ValueError("dattn_kl_scale scales grad_attn by kl_grad: both must be given, and no teacher")
    gen = general_args(q, k, attn_mask, causal)
    if gen.enabled:
        if shield or teacher is not None:
            raise ValueError("the general attention path (mask, causal, GQA, N_q != N_k) has ordinary gradients "
                             "only: shield must be False and no teacher given")
        # The general kernels are compiled for these two cases only (muse_kernels.aot): an output
        # gradient, and fp32 map gradients.
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_attn is not None and grad_attn.dtype != torch.float32:
            grad_attn = grad_attn.float()
    out_to_qk = grad_out is not None and not shield
    has_dattn = grad_attn is not None
    has_teacher = teacher is not None
    compute_dqk = out_to_qk or has_dattn or has_teacher
    compute_dv = grad_out is not None and v is not None
    dq = torch.empty_like(q) if compute_dqk else torch.zeros_like(q)
    dk = torch.empty_like(k) if compute_dqk else torch.zeros_like(k)
    dv = None if v is None else (torch.empty_like(v) if compute_dv else torch.zeros_like(v))
    if not (compute_dqk or compute_dv):
        # Shielded with no gradient on the maps: Q and K receive exactly zero.
        return dq, dk, dv

    delta = torch.empty(bsz, heads, seq, device=q.device, dtype=torch.float32)
    teacher_rowsum = None if teacher is None else teacher.sum(-1, dtype=torch.float32)
    # Tensors a kernel never reads are passed as `delta` (a valid pointer) with zero strides.
    ptr = lambda x: delta if x is None else x  # noqa: E731
    v_ = k if v is None else v
    do_strides = (0, 0, 0, 0) if grad_out is None else (*_bhn_strides(grad_out), grad_out.stride(3))
    common = dict(
        H=heads, N=seq, N_K=gen.n_keys, kv_group=gen.kv_group, causal_offset=gen.causal_offset,
        qk_scale_log2=scale * LOG2E, sm_scale=scale,
        attn_grad_weight=1.0 / heads if grad_attn is not None and grad_attn.dim() == 3 else 1.0,
        kl_scale=kl_scale, dattn_kl_scale=dattn_kl_scale,
    )
    cfg = bwd_config(dim, q.dtype, k.shape[2])
    flags = dict(HEAD_DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, OUT_TO_QK=out_to_qk,
                 HAS_DATTN=has_dattn, TEACHER=has_teacher, INPUT_PRECISION=_input_precision(q.dtype),
                 GENERAL=gen.enabled, MASK=gen.mask_kind, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if compute_dqk:
        grid = (bsz * heads * _cdiv(seq, cfg.block_m),)
        _synergistic_attention_bwd_dq_kernel[grid](
            q, k, v_, ptr(out), ptr(grad_out), ptr(grad_attn), ptr(teacher), ptr(teacher_rowsum),
            ptr(kl_grad), lse, delta, dq, ptr(gen.mask),
            *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v_), *_bhn_strides(k if out is None else out),
            *do_strides, *_map_strides(grad_attn), *_map_strides(teacher), *_row_strides(teacher_rowsum),
            *_bhn_strides(dq), *gen.mask_strides, **common, **flags,
        )
    grid = (bsz * k.shape[1] * _cdiv(k.shape[2], cfg.block_n),)
    _synergistic_attention_bwd_dkdv_kernel[grid](
        q, k, v_, ptr(grad_out), ptr(grad_attn), ptr(teacher), ptr(teacher_rowsum), ptr(kl_grad),
        lse, delta, dk, delta if dv is None else dv, ptr(gen.mask),
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v_),
        *do_strides, *_map_strides(grad_attn), *_map_strides(teacher), *_row_strides(teacher_rowsum),
        *_bhn_strides(dk), *_bhn_strides(k if dv is None else dv), *gen.mask_strides,
        **common, **flags, COMPUTE_DK=compute_dqk, COMPUTE_DV=compute_dv,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# torch.library registration: opaque custom ops with fake implementations, so that torch.compile
# traces through them without a graph break, and an autograd formula that routes the gradients.
# The CUDA C++ backend registers its launchers through the same function.


def register_attention_ops(name: str, forward, backward, general: bool = False):
    """Custom ops ``muse_kernels::<name>_fwd`` / ``_bwd`` around launchers with the signatures
    ``forward(q, k, v, scale, map_mode, attn_dtype) → (out, attn or None, lse)`` and
    ``backward(grad_out, grad_attn, q, k, v, out, lse, scale, shield) → (dq, dk, dv)``; returns
    ``(q, k, v, scale, return_attn, attn_dtype, shield, attn_mask=None, causal=False) → (out, attn or None)``.
    With ``general``, both launchers also take ``attn_mask`` and ``causal`` keywords (the general path:
    masks, causal, GQA, N_q ≠ N_k); backends without it refuse those calls."""

    def general_kwargs(attn_mask, causal):
        # Launchers without the general path keep their MUSE-only signatures.
        return {} if attn_mask is None and not causal else {"attn_mask": attn_mask, "causal": causal}

    @torch.library.custom_op(f"muse_kernels::{name}_fwd", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
        scale: float, map_mode: str, attn_dtype: torch.dtype, shield: bool, causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, attn, lse = forward(q, k, v, scale, map_mode, attn_dtype, **general_kwargs(attn_mask, causal))
        # Custom ops cannot return None: "no maps" is an empty tensor.
        return out, q.new_empty(0, dtype=attn_dtype) if attn is None else attn, lse

    @fwd_op.register_fake
    def _(q, k, v, attn_mask, scale, map_mode, attn_dtype, shield, causal):
        bsz, heads, seq, _ = q.shape
        n_keys = k.shape[2]
        if map_mode == "none":
            attn = q.new_empty(0, dtype=attn_dtype)
        elif map_mode == "head_mean":
            attn = q.new_empty(bsz, seq, n_keys, dtype=attn_dtype)
        else:
            attn = q.new_empty(bsz, heads, seq, n_keys, dtype=attn_dtype)
        return new_output(q, v), attn, q.new_empty(bsz, heads, seq, dtype=torch.float32)

    @torch.library.custom_op(f"muse_kernels::{name}_bwd", mutates_args=())
    def bwd_op(
        grad_out: torch.Tensor | None, grad_attn: torch.Tensor | None,
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        attn_mask: torch.Tensor | None, scale: float, shield: bool, causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(backward(grad_out, grad_attn, q, k, v, out, lse, scale, shield,
                              **general_kwargs(attn_mask, causal)))

    @bwd_op.register_fake
    def _(grad_out, grad_attn, q, k, v, out, lse, attn_mask, scale, shield, causal):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, scale, map_mode, _attn_dtype, shield, causal = inputs
        out, _attn, lse = output
        # Unused outputs arrive as None: "maps unused" is then known exactly, not guessed from zeros.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.scale, ctx.map_mode, ctx.shield, ctx.causal = scale, map_mode, shield, causal

    def gradients(ctx, grad_out, grad_attn, run_backward):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        if ctx.map_mode == "none":
            grad_attn = None
        dq, dk, dv = run_backward(grad_out, grad_attn, q, k, v, out, lse, attn_mask, ctx.scale, ctx.shield,
                                  ctx.causal)
        if ctx.shield and grad_attn is None:
            # Nothing reaches q and k: no gradient, as through the reference's detached maps, rather
            # than zeros, so that autograd prunes their whole branch (RoPE, norms, projections).
            dq = dk = None
        return dq, dk, dv, None, None, None, None, None, None

    def backward_formula(ctx, grad_out, grad_attn, _grad_lse):
        return gradients(ctx, grad_out, grad_attn, bwd_op)

    def eager_backward(grad_out, grad_attn, q, k, v, out, lse, attn_mask, scale, shield, causal):
        return backward(grad_out, grad_attn, q, k, v, out, lse, scale, shield, **general_kwargs(attn_mask, causal))

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)

    class EagerAttention(torch.autograd.Function):
        """The same launchers and gradient routing without the dispatcher. At MUSE's sizes the
        kernels take tens of microseconds and the custom-op machinery (dispatch, autograd wrapper,
        dynamo guard, once forward and once backward) cost several times that on the host, so eager
        calls on plain tensors come here; torch.compile, fake and subclass tensors get the ops."""

        @staticmethod
        def forward(ctx, q, k, v, attn_mask, scale, map_mode, attn_dtype, shield, causal):
            out, attn, lse = forward(q, k, v, scale, map_mode, attn_dtype, **general_kwargs(attn_mask, causal))
            setup_context(ctx, (q, k, v, attn_mask, scale, map_mode, attn_dtype, shield, causal), (out, attn, lse))
            return out, attn

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out, grad_attn):
            return gradients(ctx, grad_out, grad_attn, eager_backward)

    def attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        scale: float, return_attn: str | None, attn_dtype: torch.dtype, shield: bool,
        attn_mask: torch.Tensor | None = None, causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not general and is_general(q, k, attn_mask, causal):
            raise ValueError(f"the {name} backend supports only self-attention without masks (MUSE): no "
                             "attn_mask, causal, grouped-query heads or N_q != N_k; use backend='triton'")
        map_mode = "none" if return_attn is None else return_attn
        if use_eager_path(q, k, v, attn_mask):
            if not needs_autograd(q, k, v):
                # Inference (teachers, evaluation): no autograd node to build, nothing to save.
                out, attn, _lse = forward(q, k, v, float(scale), map_mode, attn_dtype,
                                          **general_kwargs(attn_mask, causal))
                return out, attn
            return EagerAttention.apply(q, k, v, attn_mask, float(scale), map_mode, attn_dtype, shield, causal)
        out, attn, _lse = fwd_op(q, k, v, attn_mask, float(scale), map_mode, attn_dtype, shield, causal)
        return out, (None if return_attn is None else attn)

    return attention


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def use_eager_path(*tensors: torch.Tensor | None) -> bool:
    """Plain tensors outside torch.compile and dispatch modes (FLOP counters, fake tensors,
    allocation trackers see one opaque op) can skip the custom ops (see ``EagerAttention``)."""
    return (not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and all(x is None or type(x) is torch.Tensor for x in tensors))


synergistic_attention_triton = register_attention_ops(
    "synergistic_attention",
    lambda q, k, v, scale, map_mode, attn_dtype, **general: synergistic_attention_forward(
        q, k, v, scale, map_mode, attn_dtype, **general)[:3],
    synergistic_attention_backward,
    general=True,
)
