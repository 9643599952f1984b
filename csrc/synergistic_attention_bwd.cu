// Synergistic attention backward: two deterministic kernels (no atomics), as in the Triton backend.
//
//  * a dQ kernel, one block per query block: Δ = rowsum(P ⊙ dP) (dO·O for the output path, plus one
//    pass over the keys for the maps' gradient), stored for the other kernel, then dQ = scale·dS·K;
//    register-resident mma.sync fragments for fp16/bf16 (mma_dq_kernel), shared-memory tiles and FMA
//    products for fp32 (fp32_dq_kernel).
//  * a dK/dV kernel, one block per key block: dV = Pᵀ·dO and dK = scale·dSᵀ·Q; register-resident for
//    fp16/bf16 at D = 64 (mma_dkdv_kernel), shared-memory tiles otherwise (smem_dkdv_kernel).
// dS = P ⊙ (dP − Δ) with dP = (maps' gradient) + (dO·Vᵀ only when the shield is off), plus a per-head
// KL's (rowsum(t)·P − t) when a teacher is given: with the shield on, the output gradient never reaches
// Q and K.
#include "synergistic_attention.h"
#include "tile_ops.cuh"

namespace muse {
namespace {

// Maps' gradient at (row, col) of the (b, h) slice, weighted (1/H for head-mean maps).
__device__ __forceinline__ float grad_attn_at(const BackwardParams& p, int64_t b, int64_t h, int row, int col) {
    const MapStrides& s = p.grad_attn_strides;
    return p.grad_attn_weight * load_map(p.grad_attn, p.grad_attn_dtype, b * s.b + h * s.h + row * s.m + col * s.n);
}

__device__ __forceinline__ float teacher_at(const BackwardParams& p, int64_t b, int64_t h, int row, int col) {
    const MapStrides& s = p.teacher_strides;
    return load_map(p.teacher, p.teacher_dtype, b * s.b + h * s.h + row * s.m + col * s.n);
}

// The per-head KL's share of dS at a row: weight · (rowsum(t)·P − t); weight = kl_grad · kl_scale.
__device__ __forceinline__ float kl_logit_grad(const BackwardParams& p, float weight, int64_t b, int64_t h, int row,
                                               float prob, float t) {
    const RowStrides& r = p.teacher_rowsum_strides;
    return weight * (p.teacher_rowsum[b * r.b + h * r.h + row * r.n] * prob - t);
}

template <typename T, int D, int BM, int BN>
struct DqSmem {
    static constexpr int LDT = Pad<D>::kInput, LDS = Pad<BN>::kFloat, LDP = Pad<BN>::kInput, LDO = Pad<D>::kFloat;
    enum { kQ, kDout, kK, kV, kLogits, kDprobs, kDlogits, kDq, kLse, kDelta };
    static constexpr Carving<10> kCarving = carve(
        {tile_bytes<T>(BM, LDT), tile_bytes<T>(BM, LDT), tile_bytes<T>(BN, LDT), tile_bytes<T>(BN, LDT),
         tile_bytes<float>(BM, LDS), tile_bytes<float>(BM, LDS), tile_bytes<T>(BM, LDP), tile_bytes<float>(BM, LDO),
         tile_bytes<float>(BM, 1), tile_bytes<float>(BM, 1)});
    static_assert(kCarving.bytes <= kMaxSmem, "dQ tiles exceed the shared-memory budget");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) fp32_dq_kernel(const BackwardParams p) {
    constexpr int THREADS = BM / 16 * 32;
    using Smem = DqSmem<T, D, BM, BN>;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* q_tile = region<T>(smem, kAt, Smem::kQ);
    T* do_tile = region<T>(smem, kAt, Smem::kDout);
    T* k_tile = region<T>(smem, kAt, Smem::kK);
    T* v_tile = region<T>(smem, kAt, Smem::kV);
    float* logits = region<float>(smem, kAt, Smem::kLogits);
    float* dprobs = region<float>(smem, kAt, Smem::kDprobs);
    T* dlogits = region<T>(smem, kAt, Smem::kDlogits);
    float* dq_acc = region<float>(smem, kAt, Smem::kDq);
    float* lse = region<float>(smem, kAt, Smem::kLse);
    float* delta = region<float>(smem, kAt, Smem::kDelta);

    const int seq = p.shape.seq;
    const BlockPlace place = block_place(seq, p.shape.heads, BM);
    const int64_t bh = place.bh, b = place.b, h = place.h;
    const int m0 = place.first, lane = place.lane, r0 = place.band;
    const float kl_weight = p.has_teacher ? *p.kl_grad * p.kl_scale : 0.f;

    const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h;
    const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + h * p.v_strides.h;
    load_rows<T, D, BM, THREADS>(q_tile, static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h,
                                 p.q_strides.n, m0, seq);
    if (p.out_to_qk) {
        load_rows<T, D, BM, THREADS>(do_tile,
                                     static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.b +
                                         h * p.grad_out_strides.h,
                                     p.grad_out_strides.n, m0, seq);
    }
    zero_floats<BM, D, THREADS>(dq_acc);
    // rowsum(P ⊙ dO·Vᵀ) = rowsum(dO ⊙ O): the output path's share of Δ without a pass over the keys.
    const T* out = static_cast<const T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.b + h * p.grad_out_strides.h;
    for (int r = r0; r < r0 + 16; ++r) {
        const int row = m0 + r;
        float partial = 0.f;
        if (p.out_to_qk && row < seq) {
            for (int d = lane; d < D; d += 32) {
                partial += to_float(out[row * p.out_strides.n + d]) * to_float(dout[row * p.grad_out_strides.n + d]);
            }
        }
        partial = warp_sum(partial);
        if (lane == 0) {
            delta[r] = partial;
            lse[r] = row < seq ? p.lse[bh * seq + row] : 0.f;
        }
    }

    if (p.has_grad_attn) {
        for (int n0 = 0; n0 < seq; n0 += BN) {
            __syncthreads();
            load_rows<T, D, BN, THREADS>(k_tile, k, p.k_strides.n, n0, seq);
            __syncthreads();
            for (int j = 0; j < BN; j += 16) {
                warp_mma<T, RowMajor, ColMajor>(q_tile + r0 * Smem::LDT, Smem::LDT, k_tile + j * Smem::LDT,
                                                Smem::LDT, logits + r0 * Smem::LDS + j, Smem::LDS, D, false);
            }
            __syncwarp();
            for (int r = r0; r < r0 + 16; ++r) {
                const int row = m0 + r;
                if (row >= seq) break;
                float partial = 0.f;
                for (int c = lane; c < BN && n0 + c < seq; c += 32) {
                    const float prob = exp2f(logits[r * Smem::LDS + c] * p.qk_scale_log2 - lse[r]);
                    partial += prob * grad_attn_at(p, b, h, row, n0 + c);
                }
                partial = warp_sum(partial);
                if (lane == 0) delta[r] += partial;
            }
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        if (m0 + r < seq) p.delta[bh * seq + m0 + r] = delta[r];
    }

    for (int n0 = 0; n0 < seq; n0 += BN) {
        __syncthreads();
        load_rows<T, D, BN, THREADS>(k_tile, k, p.k_strides.n, n0, seq);
        if (p.out_to_qk) load_rows<T, D, BN, THREADS>(v_tile, v, p.v_strides.n, n0, seq);
        __syncthreads();
        for (int j = 0; j < BN; j += 16) {
            warp_mma<T, RowMajor, ColMajor>(q_tile + r0 * Smem::LDT, Smem::LDT, k_tile + j * Smem::LDT, Smem::LDT,
                                            logits + r0 * Smem::LDS + j, Smem::LDS, D, false);
            if (p.out_to_qk) {
                warp_mma<T, RowMajor, ColMajor>(do_tile + r0 * Smem::LDT, Smem::LDT, v_tile + j * Smem::LDT,
                                                Smem::LDT, dprobs + r0 * Smem::LDS + j, Smem::LDS, D, false);
            }
        }
        __syncwarp();
        for (int r = r0; r < r0 + 16; ++r) {
            const int row = m0 + r;
            for (int c = lane; c < BN; c += 32) {
                const int col = n0 + c;
                float ds = 0.f;
                if (row < seq && col < seq) {
                    const float prob = exp2f(logits[r * Smem::LDS + c] * p.qk_scale_log2 - lse[r]);
                    float dp = p.out_to_qk ? dprobs[r * Smem::LDS + c] : 0.f;
                    if (p.has_grad_attn) dp += grad_attn_at(p, b, h, row, col);
                    ds = prob * (dp - delta[r]);
                    if (p.has_teacher) {
                        ds += kl_logit_grad(p, kl_weight, b, h, row, prob, teacher_at(p, b, h, row, col));
                    }
                }
                dlogits[r * Smem::LDP + c] = from_float<T>(ds);
            }
        }
        __syncwarp();
        for (int j = 0; j < D; j += 16) {
            warp_mma<T, RowMajor, RowMajor>(dlogits + r0 * Smem::LDP, Smem::LDP, k_tile + j, Smem::LDT,
                                            dq_acc + r0 * Smem::LDO + j, Smem::LDO, BN, true);
        }
    }
    __syncwarp();

    T* dq = static_cast<T*>(p.dq) + b * p.dq_strides.b + h * p.dq_strides.h;
    for (int r = r0; r < r0 + 16; ++r) {
        const int row = m0 + r;
        if (row >= seq) break;
        for (int d = lane; d < D; d += 32) {
            dq[row * p.dq_strides.n + d] = from_float<T>(dq_acc[r * Smem::LDO + d] * p.sm_scale);
        }
    }
}

// acc (+)= OP·B for the warp's 16 rows: OP (16 × K, K = BM) in C fragments (op[j] holds columns
// [8j, 8j + 8)), repacked in registers as A fragments; B (K × D) a row-major tile in shared memory, read
// transposed: matrix m holds rows 16kk + 8·(m & 1), columns 16·dpair + 8·(m >> 1).
template <typename T, int D, int K, int LD>
__device__ __forceinline__ void accumulate_product(float (&acc)[D / 8][4], const float (&op)[K / 8][4],
                                                   const T* b_tile, int lane) {
    const int ld_row = lane & 7, ld_matrix = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        const uint32_t a[4] = {pack_floats<T>(op[2 * kk][0], op[2 * kk][1]), pack_floats<T>(op[2 * kk][2], op[2 * kk][3]),
                               pack_floats<T>(op[2 * kk + 1][0], op[2 * kk + 1][1]),
                               pack_floats<T>(op[2 * kk + 1][2], op[2 * kk + 1][3])};
#pragma unroll
        for (int dpair = 0; dpair < D / 16; ++dpair) {
            uint32_t bb[4];
            ldmatrix_x4_trans(bb, b_tile + (kk * 16 + (ld_matrix & 1) * 8 + ld_row) * LD + dpair * 16 + (ld_matrix >> 1) * 8);
            const uint32_t first[2] = {bb[0], bb[1]}, second[2] = {bb[2], bb[3]};
            mma_m16n8k16<T>(acc[2 * dpair], a, first);
            mma_m16n8k16<T>(acc[2 * dpair + 1], a, second);
        }
    }
}

// fp16/bf16 dQ kernel on register-resident fragments (layouts as in the forward, mma_sm80.cuh): warp w
// owns query rows [16w, 16w + 16); S = Q·Kᵀ and dP = dO·Vᵀ are fp32 registers, dS is formed in place
// and repacked as the A fragment of dQ += dS·K (K read transposed by ldmatrix), dQ stays in registers.
// Q and dO stay in shared memory (their fragments are reloaded per k step, which keeps the register
// count down); K and V tiles are double-buffered with cp.async.
template <typename T, int D, int BM, int BN>
struct MmaDqSmem {
    static constexpr int LD = Pad<D>::kInput;
    enum { kQ, kDout, kK, kV, kLse, kDelta };  // K and V: two buffers each
    static constexpr Carving<6> kCarving =
        carve({tile_bytes<T>(BM, LD), tile_bytes<T>(BM, LD), 2 * tile_bytes<T>(BN, LD), 2 * tile_bytes<T>(BN, LD),
               tile_bytes<float>(BM, 1), tile_bytes<float>(BM, 1)});
    static_assert(kCarving.bytes <= kMaxSmem, "dQ tiles exceed the shared-memory budget");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) mma_dq_kernel(const BackwardParams p) {
    constexpr int THREADS = BM / 16 * 32;
    constexpr int S_BLOCKS = BN / 8, O_BLOCKS = D / 8;
    using Smem = MmaDqSmem<T, D, BM, BN>;
    constexpr int LD = Smem::LD;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* q_tile = region<T>(smem, kAt, Smem::kQ);
    T* do_tile = region<T>(smem, kAt, Smem::kDout);
    T* k_tiles = region<T>(smem, kAt, Smem::kK);
    T* v_tiles = region<T>(smem, kAt, Smem::kV);
    float* lse = region<float>(smem, kAt, Smem::kLse);
    float* delta = region<float>(smem, kAt, Smem::kDelta);

    const int seq = p.shape.seq;
    const BlockPlace place = block_place(seq, p.shape.heads, BM);
    const int64_t bh = place.bh, b = place.b, h = place.h;
    const int m0 = place.first, lane = place.lane, r0 = place.band;
    const int group = lane >> 2, pair = lane & 3;
    const int rows[2] = {m0 + r0 + group, m0 + r0 + group + 8};
    const float kl_weight = p.has_teacher ? *p.kl_grad * p.kl_scale : 0.f;
    const int tiles = (seq + BN - 1) / BN;

    const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h;
    const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + h * p.v_strides.h;
    load_rows_async<T, D, BM, THREADS>(q_tile, static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h,
                                       p.q_strides.n, m0, seq);
    if (p.out_to_qk) {
        load_rows_async<T, D, BM, THREADS>(
            do_tile, static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.b + h * p.grad_out_strides.h,
            p.grad_out_strides.n, m0, seq);
    }
    cp_async_commit();
    // rowsum(P ⊙ dO·Vᵀ) = rowsum(dO ⊙ O): the output path's share of Δ without a pass over the keys.
    const T* out = static_cast<const T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.b + h * p.grad_out_strides.h;
    for (int r = r0; r < r0 + 16; ++r) {
        const int row = m0 + r;
        float partial = 0.f;
        if (p.out_to_qk && row < seq) {
            for (int d = lane; d < D; d += 32) {
                partial += to_float(out[row * p.out_strides.n + d]) * to_float(dout[row * p.grad_out_strides.n + d]);
            }
        }
        partial = warp_sum(partial);
        if (lane == 0) {
            delta[r] = partial;
            lse[r] = row < seq ? p.lse[bh * seq + row] : 0.f;
        }
    }
    __syncwarp();  // the band's lse and Δ (this warp's rows only) are visible to its lanes
    const float row_lse[2] = {lse[r0 + group], lse[r0 + group + 8]};

    // One pass over the key tiles (K only, to Δ's map share), then one (K and, unshielded, V) to dQ.
    // Both double-buffer their tiles: tile j + 1 is in flight while tile j is used.
    const auto issue = [&](int tile, bool with_v) {
        const int buffer = tile & 1;
        load_rows_async<T, D, BN, THREADS>(k_tiles + buffer * BN * LD, k, p.k_strides.n, tile * BN, seq);
        if (with_v) load_rows_async<T, D, BN, THREADS>(v_tiles + buffer * BN * LD, v, p.v_strides.n, tile * BN, seq);
        cp_async_commit();
    };
    const auto wait_for = [&](int tile, bool with_v) {
        if (tile + 1 < tiles) {
            issue(tile + 1, with_v);  // the other buffers were last read before the previous closing barrier
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
    };

    float map_share[2] = {0.f, 0.f};
    if (p.has_grad_attn) {
        issue(0, false);
        for (int tile = 0; tile < tiles; ++tile) {
            wait_for(tile, false);
            float s[S_BLOCKS][4];
            warp_rows_times_rows_t<T, D, BN, LD>(s, q_tile, k_tiles + (tile & 1) * BN * LD, r0, lane);
#pragma unroll
            for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = rows[e >> 1], col = tile * BN + 8 * j + 2 * pair + (e & 1);
                    if (row < seq && col < seq) {
                        const float prob = exp2f(s[j][e] * p.qk_scale_log2 - row_lse[e >> 1]);
                        map_share[e >> 1] += prob * grad_attn_at(p, b, h, row, col);
                    }
                }
            }
            __syncthreads();  // every warp is done with this tile's buffer before it is refilled
        }
    }
    float row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float share = map_share[r] + __shfl_xor_sync(0xffffffffu, map_share[r], 1);
        share += __shfl_xor_sync(0xffffffffu, share, 2);
        row_delta[r] = delta[r0 + group + 8 * r] + share;
        if (pair == 0 && rows[r] < seq) p.delta[bh * seq + rows[r]] = row_delta[r];
    }

    float dq[O_BLOCKS][4];
#pragma unroll
    for (int j = 0; j < O_BLOCKS; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
    issue(0, p.out_to_qk);
    for (int tile = 0; tile < tiles; ++tile) {
        wait_for(tile, p.out_to_qk);  // at tile 0 also Q and dO
        const int n0 = tile * BN;
        const T* k_tile = k_tiles + (tile & 1) * BN * LD;
        float s[S_BLOCKS][4], dp[S_BLOCKS][4];
        warp_rows_times_rows_t<T, D, BN, LD>(s, q_tile, k_tile, r0, lane);
        if (p.out_to_qk) {
            warp_rows_times_rows_t<T, D, BN, LD>(dp, do_tile, v_tiles + (tile & 1) * BN * LD, r0, lane);
        } else {
#pragma unroll
            for (int j = 0; j < S_BLOCKS; ++j) dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
        }
        // dS in place of S: row rows[e >> 1], key n0 + 8j + 2·pair + (e & 1).
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = rows[e >> 1], col = n0 + 8 * j + 2 * pair + (e & 1);
                float ds = 0.f;
                if (row < seq && col < seq) {
                    const float prob = exp2f(s[j][e] * p.qk_scale_log2 - row_lse[e >> 1]);
                    float dpv = dp[j][e];
                    if (p.has_grad_attn) dpv += grad_attn_at(p, b, h, row, col);
                    ds = prob * (dpv - row_delta[e >> 1]);
                    if (p.has_teacher) ds += kl_logit_grad(p, kl_weight, b, h, row, prob, teacher_at(p, b, h, row, col));
                }
                s[j][e] = ds;
            }
        }
        accumulate_product<T, D, BN, LD>(dq, s, k_tile, lane);  // dQ += dS·K
        __syncthreads();  // every warp is done with this tile's buffers before they are refilled
    }

    T* dq_out = static_cast<T*>(p.dq) + b * p.dq_strides.b + h * p.dq_strides.h;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= seq) continue;
        T* dq_row = dq_out + static_cast<int64_t>(rows[r]) * p.dq_strides.n + 2 * pair;
#pragma unroll
        for (int j = 0; j < O_BLOCKS; ++j) {
            dq_row[8 * j] = from_float<T>(dq[j][2 * r] * p.sm_scale);
            dq_row[8 * j + 1] = from_float<T>(dq[j][2 * r + 1] * p.sm_scale);
        }
    }
}

template <typename T, int D, int BM, int BN>
struct DkvSmem {
    static constexpr int LDT = Pad<D>::kInput, LDS = Pad<BM>::kFloat, LDP = Pad<BM>::kInput, LDO = Pad<D>::kFloat;
    static constexpr int LDM = BN + 1;  // odd: reading a column of the staged map is free of bank conflicts
    enum { kK, kV, kQ, kDout, kProbsT, kDprobsT, kOperandT, kDk, kDv, kLse, kDelta, kMap };
    static constexpr Carving<12> kCarving = carve(
        {tile_bytes<T>(BN, LDT), tile_bytes<T>(BN, LDT), tile_bytes<T>(BM, LDT), tile_bytes<T>(BM, LDT),
         tile_bytes<float>(BN, LDS), tile_bytes<float>(BN, LDS), tile_bytes<T>(BN, LDP), tile_bytes<float>(BN, LDO),
         tile_bytes<float>(BN, LDO), tile_bytes<float>(BM, 1), tile_bytes<float>(BM, 1), tile_bytes<float>(BM, LDM)});
    static_assert(kCarving.bytes <= kMaxSmem, "dK/dV tiles exceed the shared-memory budget");
};

// fp32 inputs, and fp16/bf16 at D = 128: warp w owns key rows [16w, 16w + 16) of the block; tiles are
// transposed (key rows × query columns), in shared memory, products by warp_mma (FMA, or WMMA).
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BN / 16 * 32) smem_dkdv_kernel(const BackwardParams p) {
    constexpr int THREADS = BN / 16 * 32;
    using Smem = DkvSmem<T, D, BM, BN>;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* k_tile = region<T>(smem, kAt, Smem::kK);
    T* v_tile = region<T>(smem, kAt, Smem::kV);
    T* q_tile = region<T>(smem, kAt, Smem::kQ);
    T* do_tile = region<T>(smem, kAt, Smem::kDout);
    float* probs_t = region<float>(smem, kAt, Smem::kProbsT);
    float* dprobs_t = region<float>(smem, kAt, Smem::kDprobsT);
    T* operand_t = region<T>(smem, kAt, Smem::kOperandT);  // Pᵀ for dV, then dSᵀ for dK
    float* dk_acc = region<float>(smem, kAt, Smem::kDk);
    float* dv_acc = region<float>(smem, kAt, Smem::kDv);
    float* lse = region<float>(smem, kAt, Smem::kLse);
    float* delta = region<float>(smem, kAt, Smem::kDelta);
    // The (query × key) tile of the maps' gradient, or of the teacher, read row by row (coalesced) and
    // used column by column: a warp here owns key rows, so reading the map directly would stride.
    float* map_tile = region<float>(smem, kAt, Smem::kMap);

    const int seq = p.shape.seq;
    const BlockPlace place = block_place(seq, p.shape.heads, BN);
    const int64_t bh = place.bh, b = place.b, h = place.h;
    const int n0 = place.first, lane = place.lane, r0 = place.band;
    const float kl_weight = p.has_teacher ? *p.kl_grad * p.kl_scale : 0.f;
    const bool need_dout = p.compute_dv || p.out_to_qk;
    // One staged map per block: the maps' gradient, else the teacher (the API never passes both).
    const bool stage_grad_attn = p.compute_dqk && p.has_grad_attn;
    const bool stage_teacher = p.compute_dqk && p.has_teacher && !p.has_grad_attn;

    load_rows<T, D, BN, THREADS>(k_tile, static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h,
                                 p.k_strides.n, n0, seq);
    if (p.out_to_qk) {
        load_rows<T, D, BN, THREADS>(v_tile, static_cast<const T*>(p.v) + b * p.v_strides.b + h * p.v_strides.h,
                                     p.v_strides.n, n0, seq);
    }
    zero_floats<BN, D, THREADS>(dk_acc);
    zero_floats<BN, D, THREADS>(dv_acc);
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.b + h * p.grad_out_strides.h;

    for (int m0 = 0; m0 < seq; m0 += BM) {
        __syncthreads();
        load_rows<T, D, BM, THREADS>(q_tile, q, p.q_strides.n, m0, seq);
        if (need_dout) load_rows<T, D, BM, THREADS>(do_tile, dout, p.grad_out_strides.n, m0, seq);
        for (int c = threadIdx.x; c < BM; c += THREADS) {
            const int row = m0 + c;
            // +inf for padded query rows makes their probabilities exactly 0.
            lse[c] = row < seq ? p.lse[bh * seq + row] : INFINITY;
            delta[c] = row < seq && p.compute_dqk ? p.delta[bh * seq + row] : 0.f;
        }
        if (stage_grad_attn || stage_teacher) {
            for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
                const int c = i / BN, r = i % BN;
                const int row = m0 + c, col = n0 + r;
                float value = 0.f;
                if (row < seq && col < seq) {
                    value = stage_grad_attn ? grad_attn_at(p, b, h, row, col) : teacher_at(p, b, h, row, col);
                }
                map_tile[c * Smem::LDM + r] = value;
            }
        }
        __syncthreads();
        for (int j = 0; j < BM; j += 16) {
            warp_mma<T, RowMajor, ColMajor>(k_tile + r0 * Smem::LDT, Smem::LDT, q_tile + j * Smem::LDT, Smem::LDT,
                                            probs_t + r0 * Smem::LDS + j, Smem::LDS, D, false);
            if (p.out_to_qk) {
                warp_mma<T, RowMajor, ColMajor>(v_tile + r0 * Smem::LDT, Smem::LDT, do_tile + j * Smem::LDT,
                                                Smem::LDT, dprobs_t + r0 * Smem::LDS + j, Smem::LDS, D, false);
            }
        }
        __syncwarp();
        for (int r = r0; r < r0 + 16; ++r) {
            const bool key_ok = n0 + r < seq;
            for (int c = lane; c < BM; c += 32) {
                const float prob =
                    key_ok ? exp2f(probs_t[r * Smem::LDS + c] * p.qk_scale_log2 - lse[c]) : 0.f;
                probs_t[r * Smem::LDS + c] = prob;
                operand_t[r * Smem::LDP + c] = from_float<T>(prob);
            }
        }
        __syncwarp();
        if (p.compute_dv) {
            for (int j = 0; j < D; j += 16) {
                warp_mma<T, RowMajor, RowMajor>(operand_t + r0 * Smem::LDP, Smem::LDP, do_tile + j, Smem::LDT,
                                                dv_acc + r0 * Smem::LDO + j, Smem::LDO, BM, true);
            }
            __syncwarp();
        }
        if (p.compute_dqk) {
            for (int r = r0; r < r0 + 16; ++r) {
                const int col = n0 + r;
                for (int c = lane; c < BM; c += 32) {
                    const int row = m0 + c;
                    float ds = 0.f;
                    if (row < seq && col < seq) {
                        const float prob = probs_t[r * Smem::LDS + c];
                        float dp = p.out_to_qk ? dprobs_t[r * Smem::LDS + c] : 0.f;
                        if (stage_grad_attn) dp += map_tile[c * Smem::LDM + r];
                        ds = prob * (dp - delta[c]);
                        if (stage_teacher) {
                            ds += kl_logit_grad(p, kl_weight, b, h, row, prob, map_tile[c * Smem::LDM + r]);
                        } else if (p.has_teacher) {
                            ds += kl_logit_grad(p, kl_weight, b, h, row, prob, teacher_at(p, b, h, row, col));
                        }
                    }
                    operand_t[r * Smem::LDP + c] = from_float<T>(ds);
                }
            }
            __syncwarp();
            for (int j = 0; j < D; j += 16) {
                warp_mma<T, RowMajor, RowMajor>(operand_t + r0 * Smem::LDP, Smem::LDP, q_tile + j, Smem::LDT,
                                                dk_acc + r0 * Smem::LDO + j, Smem::LDO, BM, true);
            }
            __syncwarp();
        }
    }

    T* dk = static_cast<T*>(p.dk) + b * p.dk_strides.b + h * p.dk_strides.h;
    T* dv = static_cast<T*>(p.dv) + b * p.dv_strides.b + h * p.dv_strides.h;
    for (int r = r0; r < r0 + 16; ++r) {
        const int row = n0 + r;
        if (row >= seq) break;
        for (int d = lane; d < D; d += 32) {
            if (p.compute_dqk) dk[row * p.dk_strides.n + d] = from_float<T>(dk_acc[r * Smem::LDO + d] * p.sm_scale);
            if (p.compute_dv) dv[row * p.dv_strides.n + d] = from_float<T>(dv_acc[r * Smem::LDO + d]);
        }
    }
}

// fp16/bf16 dK/dV kernel on register-resident fragments: warp w owns key rows [16w, 16w + 16) of the
// block and keeps dK, dV in registers. Per query tile, Sᵀ = K·Qᵀ (and, unshielded, dPᵀ = V·dOᵀ) are fp32
// registers with key rows and query columns; Pᵀ, then dSᵀ, repacked in registers, are the A fragments of
// dV += Pᵀ·dO and dK += dSᵀ·Q (dO and Q read transposed by ldmatrix). Q and dO tiles are
// double-buffered with cp.async; the per-query LSE, Δ and the staged map tile are loaded synchronously.
template <typename T, int D, int BM, int BN>
struct MmaDkvSmem {
    static constexpr int LD = Pad<D>::kInput;
    static constexpr int LDM = BN + 1;  // odd: reading a column of the staged map is free of bank conflicts
    enum { kK, kV, kQ, kDout, kLse, kDelta, kMap };  // Q and dO: two buffers each
    static constexpr Carving<7> kCarving =
        carve({tile_bytes<T>(BN, LD), tile_bytes<T>(BN, LD), 2 * tile_bytes<T>(BM, LD), 2 * tile_bytes<T>(BM, LD),
               tile_bytes<float>(BM, 1), tile_bytes<float>(BM, 1), tile_bytes<float>(BM, LDM)});
    static_assert(kCarving.bytes <= kMaxSmem, "dK/dV tiles exceed the shared-memory budget");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BN / 16 * 32) mma_dkdv_kernel(const BackwardParams p) {
    constexpr int THREADS = BN / 16 * 32;
    constexpr int S_BLOCKS = BM / 8, O_BLOCKS = D / 8;
    using Smem = MmaDkvSmem<T, D, BM, BN>;
    constexpr int LD = Smem::LD;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* k_tile = region<T>(smem, kAt, Smem::kK);
    T* v_tile = region<T>(smem, kAt, Smem::kV);
    T* q_tiles = region<T>(smem, kAt, Smem::kQ);
    T* do_tiles = region<T>(smem, kAt, Smem::kDout);
    float* lse = region<float>(smem, kAt, Smem::kLse);
    float* delta = region<float>(smem, kAt, Smem::kDelta);
    // The (query × key) tile of the maps' gradient, or of the teacher, read row by row (coalesced) and
    // used column by column: a warp here owns key rows, so reading the map directly would stride.
    float* map_tile = region<float>(smem, kAt, Smem::kMap);

    const int seq = p.shape.seq;
    const BlockPlace place = block_place(seq, p.shape.heads, BN);
    const int64_t bh = place.bh, b = place.b, h = place.h;
    const int n0 = place.first, lane = place.lane, r0 = place.band;
    const int group = lane >> 2, pair = lane & 3;
    const int keys[2] = {n0 + r0 + group, n0 + r0 + group + 8};
    const float kl_weight = p.has_teacher ? *p.kl_grad * p.kl_scale : 0.f;
    const bool need_dout = p.compute_dv || p.out_to_qk;
    // One staged map per block: the maps' gradient, else the teacher (the API never passes both).
    const bool stage_grad_attn = p.compute_dqk && p.has_grad_attn;
    const bool stage_teacher = p.compute_dqk && p.has_teacher && !p.has_grad_attn;
    const int tiles = (seq + BM - 1) / BM;

    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.b + h * p.grad_out_strides.h;
    load_rows_async<T, D, BN, THREADS>(k_tile, static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h,
                                       p.k_strides.n, n0, seq);
    if (p.out_to_qk) {
        load_rows_async<T, D, BN, THREADS>(v_tile, static_cast<const T*>(p.v) + b * p.v_strides.b + h * p.v_strides.h,
                                           p.v_strides.n, n0, seq);
    }
    load_rows_async<T, D, BM, THREADS>(q_tiles, q, p.q_strides.n, 0, seq);
    if (need_dout) load_rows_async<T, D, BM, THREADS>(do_tiles, dout, p.grad_out_strides.n, 0, seq);
    cp_async_commit();

    float dk[O_BLOCKS][4], dv[O_BLOCKS][4];
#pragma unroll
    for (int j = 0; j < O_BLOCKS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
    }

    for (int tile = 0; tile < tiles; ++tile) {
        const int m0 = tile * BM;
        if (tile + 1 < tiles) {
            // The other buffers, and the single LSE/Δ/map buffers, were last read before the previous
            // iteration's closing barrier.
            const int next = (tile + 1) & 1;
            load_rows_async<T, D, BM, THREADS>(q_tiles + next * BM * LD, q, p.q_strides.n, m0 + BM, seq);
            if (need_dout) {
                load_rows_async<T, D, BM, THREADS>(do_tiles + next * BM * LD, dout, p.grad_out_strides.n, m0 + BM, seq);
            }
            cp_async_commit();
        }
        for (int c = threadIdx.x; c < BM; c += THREADS) {
            const int row = m0 + c;
            // +inf for padded query rows makes their probabilities exactly 0.
            lse[c] = row < seq ? p.lse[bh * seq + row] : INFINITY;
            delta[c] = row < seq && p.compute_dqk ? p.delta[bh * seq + row] : 0.f;
        }
        if (stage_grad_attn || stage_teacher) {
            for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
                const int c = i / BN, r = i % BN;
                const int row = m0 + c, col = n0 + r;
                float value = 0.f;
                if (row < seq && col < seq) {
                    value = stage_grad_attn ? grad_attn_at(p, b, h, row, col) : teacher_at(p, b, h, row, col);
                }
                map_tile[c * Smem::LDM + r] = value;
            }
        }
        if (tile + 1 < tiles) {
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* q_tile = q_tiles + (tile & 1) * BM * LD;
        const T* do_tile = do_tiles + (tile & 1) * BM * LD;

        // st[j][e]: key keys[e >> 1], query m0 + 8j + 2·pair + (e & 1) (column index c in the tile).
        float st[S_BLOCKS][4];
        warp_rows_times_rows_t<T, D, BM, LD>(st, k_tile, q_tile, r0, lane);
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * j + 2 * pair + (e & 1);
                st[j][e] = keys[e >> 1] < seq ? exp2f(st[j][e] * p.qk_scale_log2 - lse[c]) : 0.f;
            }
        }
        if (p.compute_dv) accumulate_product<T, D, BM, LD>(dv, st, do_tile, lane);
        if (p.compute_dqk) {
            float dpt[S_BLOCKS][4];
            if (p.out_to_qk) {
                warp_rows_times_rows_t<T, D, BM, LD>(dpt, v_tile, do_tile, r0, lane);
            } else {
#pragma unroll
                for (int j = 0; j < S_BLOCKS; ++j) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
            }
            // dSᵀ in place of dPᵀ.
#pragma unroll
            for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 8 * j + 2 * pair + (e & 1), r = r0 + group + 8 * (e >> 1);
                    const int row = m0 + c, col = keys[e >> 1];
                    float ds = 0.f;
                    if (row < seq && col < seq) {
                        const float prob = st[j][e];
                        float dp = dpt[j][e];
                        if (stage_grad_attn) dp += map_tile[c * Smem::LDM + r];
                        ds = prob * (dp - delta[c]);
                        if (stage_teacher) {
                            ds += kl_logit_grad(p, kl_weight, b, h, row, prob, map_tile[c * Smem::LDM + r]);
                        } else if (p.has_teacher) {
                            ds += kl_logit_grad(p, kl_weight, b, h, row, prob, teacher_at(p, b, h, row, col));
                        }
                    }
                    dpt[j][e] = ds;
                }
            }
            accumulate_product<T, D, BM, LD>(dk, dpt, q_tile, lane);
        }
        __syncthreads();  // every warp is done with this tile's buffers before they are refilled
    }

    T* dk_out = static_cast<T*>(p.dk) + b * p.dk_strides.b + h * p.dk_strides.h;
    T* dv_out = static_cast<T*>(p.dv) + b * p.dv_strides.b + h * p.dv_strides.h;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (keys[r] >= seq) continue;
#pragma unroll
        for (int j = 0; j < O_BLOCKS; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int d = 8 * j + 2 * pair + c;
                if (p.compute_dqk) dk_out[keys[r] * p.dk_strides.n + d] = from_float<T>(dk[j][2 * r + c] * p.sm_scale);
                if (p.compute_dv) dv_out[keys[r] * p.dv_strides.n + d] = from_float<T>(dv[j][2 * r + c]);
            }
        }
    }
}

template <typename T, int D>
struct BackwardOp {
    static cudaError_t run(const BackwardParams& p, cudaStream_t stream) {
        const int64_t bh = int64_t{p.shape.batch} * p.shape.heads;
        if (p.compute_dqk) {
            cudaError_t err;
            if constexpr (std::is_same_v<T, float>) {
                constexpr int BM = Blocks<T, D>::kDqM, BN = Blocks<T, D>::kDqN;
                err = launch(fp32_dq_kernel<T, D, BM, BN>, bh * ((p.shape.seq + BM - 1) / BM), BM / 16 * 32,
                             DqSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
            } else {
                constexpr int BM = Blocks<T, D>::kMmaDqM, BN = Blocks<T, D>::kMmaDqN;
                err = launch(mma_dq_kernel<T, D, BM, BN>, bh * ((p.shape.seq + BM - 1) / BM), BM / 16 * 32,
                             MmaDqSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
            }
            if (err != cudaSuccess) return err;
        }
        // At D = 128 the register-resident kernel's dK and dV (128 fp32 registers per lane) spill, so fp16
        // and bf16 keep the shared-memory kernel there.
        if constexpr (std::is_same_v<T, float> || D == 128) {
            constexpr int BM = Blocks<T, D>::kDkvM, BN = Blocks<T, D>::kDkvN;
            return launch(smem_dkdv_kernel<T, D, BM, BN>, bh * ((p.shape.seq + BN - 1) / BN), BN / 16 * 32,
                          DkvSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
        } else {
            constexpr int BM = Blocks<T, D>::kMmaDkvM, BN = Blocks<T, D>::kMmaDkvN;
            return launch(mma_dkdv_kernel<T, D, BM, BN>, bh * ((p.shape.seq + BN - 1) / BN), BN / 16 * 32,
                          MmaDkvSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
        }
    }
};

}  // namespace

cudaError_t synergistic_attention_backward(const BackwardParams& params, cudaStream_t stream) {
    if (!supported_head_dim(params.shape.head_dim) || params.shape.seq < 1) return cudaErrorInvalidValue;
    if (!params.compute_dqk && !params.compute_dv) return cudaSuccess;
    return dispatch<BackwardOp>(params, stream);
}

}  // namespace muse
