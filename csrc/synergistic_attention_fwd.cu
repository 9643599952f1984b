// Synergistic attention forward: output and row log-sum-exp (flash-style online softmax; fp16/bf16 on
// register-resident mma.sync fragments, fp32 with FMA products), and the normalized maps (per head, or
// averaged over heads inside one block: no atomics, and the (B, H, N, N) tensor never exists for
// head-mean maps).
#include "synergistic_attention.h"
#include "tile_ops.cuh"

namespace muse {
namespace {

template <typename T, int D, int BM, int BN>
struct ForwardSmem {
    static constexpr int LDT = Pad<D>::kInput, LDS = Pad<BN>::kFloat, LDP = Pad<BN>::kInput, LDO = Pad<D>::kFloat;
    enum { kQ, kK, kV, kLogits, kProbs, kAcc, kRowMax, kRowSum, kTeacherSums };
    static constexpr Carving<9> kCarving =
        carve({tile_bytes<T>(BM, LDT), tile_bytes<T>(BN, LDT), tile_bytes<T>(BN, LDT), tile_bytes<float>(BM, LDS),
               tile_bytes<T>(BM, LDP), tile_bytes<float>(BM, LDO), tile_bytes<float>(BM, 1), tile_bytes<float>(BM, 1),
               tile_bytes<float>(BM, 3)});
    static_assert(kCarving.bytes <= kMaxSmem, "forward tiles exceed the shared-memory budget");
};

// fp32 inputs: one block per (batch·head, query block); warp w owns query rows [16w, 16w + 16); tiles
// and accumulators in shared memory, products by FMA (warp_mma), exact to IEEE rounding.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) fp32_forward_kernel(const ForwardParams p) {
    constexpr int THREADS = BM / 16 * 32;
    using Smem = ForwardSmem<T, D, BM, BN>;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* q_tile = region<T>(smem, kAt, Smem::kQ);
    T* k_tile = region<T>(smem, kAt, Smem::kK);
    T* v_tile = region<T>(smem, kAt, Smem::kV);
    float* logits = region<float>(smem, kAt, Smem::kLogits);
    T* probs = region<T>(smem, kAt, Smem::kProbs);
    float* acc = region<float>(smem, kAt, Smem::kAcc);
    float* row_max = region<float>(smem, kAt, Smem::kRowMax);
    float* row_sum = region<float>(smem, kAt, Smem::kRowSum);
    // Per row: Σ t·log t, Σ t·s (log2 units), Σ t. KL(t ‖ A) = Σ t·log t − ln2·(Σ t·s − lse2·Σ t)
    // needs nothing else, and none of the sums depends on the running maximum.
    float* teacher_sums = region<float>(smem, kAt, Smem::kTeacherSums);

    const int seq = p.shape.seq;
    const BlockPlace place = block_place(seq, p.shape.heads, BM);
    const int64_t bh = place.bh, b = place.b, h = place.h;
    const int m0 = place.first, lane = place.lane, r0 = place.band;
    const bool has_v = p.v != nullptr, has_teacher = p.teacher != nullptr;

    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
    const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h;
    const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + h * p.v_strides.h;
    const int64_t teacher_base = b * p.teacher_strides.b + h * p.teacher_strides.h;
    load_rows<T, D, BM, THREADS>(q_tile, q, p.q_strides.n, m0, seq);
    zero_floats<BM, D, THREADS>(acc);
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0.f;
        teacher_sums[3 * r] = teacher_sums[3 * r + 1] = teacher_sums[3 * r + 2] = 0.f;
    }

    for (int n0 = 0; n0 < seq; n0 += BN) {
        __syncthreads();  // the previous tiles are no longer read
        load_rows<T, D, BN, THREADS>(k_tile, k, p.k_strides.n, n0, seq);
        if (has_v) load_rows<T, D, BN, THREADS>(v_tile, v, p.v_strides.n, n0, seq);
        __syncthreads();
        for (int j = 0; j < BN; j += 16) {
            warp_mma<T, RowMajor, ColMajor>(q_tile + r0 * Smem::LDT, Smem::LDT, k_tile + j * Smem::LDT, Smem::LDT,
                                            logits + r0 * Smem::LDS + j, Smem::LDS, D, false);
        }
        __syncwarp();
        for (int r = r0; r < r0 + 16; ++r) {
            if (has_teacher && m0 + r < seq) {
                float t_logt = 0.f, t_s = 0.f, t_sum = 0.f;
                for (int c = lane; c < BN && n0 + c < seq; c += 32) {
                    const int64_t index = teacher_base + (m0 + r) * p.teacher_strides.m + (n0 + c) * p.teacher_strides.n;
                    const float t = load_map(p.teacher, p.teacher_dtype, index);
                    t_logt += t > 0.f ? t * logf(t) : 0.f;
                    t_s += t * logits[r * Smem::LDS + c] * p.qk_scale_log2;
                    t_sum += t;
                }
                t_logt = warp_sum(t_logt);
                t_s = warp_sum(t_s);
                t_sum = warp_sum(t_sum);
                if (lane == 0) {
                    teacher_sums[3 * r] += t_logt;
                    teacher_sums[3 * r + 1] += t_s;
                    teacher_sums[3 * r + 2] += t_sum;
                }
            }
            float s[BN / 32];
            float tile_max = -INFINITY;
#pragma unroll
            for (int i = 0; i < BN / 32; ++i) {
                const int c = lane + 32 * i;
                s[i] = n0 + c < seq ? logits[r * Smem::LDS + c] * p.qk_scale_log2 : -INFINITY;
                tile_max = fmaxf(tile_max, s[i]);
            }
            // Column n0 is a real key, so the new maximum is finite from the first tile on.
            const float old_max = row_max[r];
            const float new_max = fmaxf(old_max, warp_max(tile_max));
            const float alpha = exp2f(old_max - new_max);
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < BN / 32; ++i) {
                const float e = exp2f(s[i] - new_max);
                probs[r * Smem::LDP + lane + 32 * i] = from_float<T>(e);
                sum += e;
            }
            sum = warp_sum(sum);
            for (int d = lane; d < D; d += 32) acc[r * Smem::LDO + d] *= alpha;
            __syncwarp();  // every lane has read row_max[r] before it changes
            if (lane == 0) {
                row_max[r] = new_max;
                row_sum[r] = row_sum[r] * alpha + sum;
            }
        }
        __syncwarp();
        if (has_v) {
            for (int j = 0; j < D; j += 16) {
                warp_mma<T, RowMajor, RowMajor>(probs + r0 * Smem::LDP, Smem::LDP, v_tile + j, Smem::LDT,
                                                acc + r0 * Smem::LDO + j, Smem::LDO, BN, true);
            }
        }
    }
    __syncwarp();

    T* out = static_cast<T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h;
    constexpr float kLn2 = 0.6931471805599453f;
    for (int r = r0; r < r0 + 16; ++r) {
        const int row = m0 + r;
        if (row >= seq) break;
        const float total = row_sum[r];
        const float lse2 = row_max[r] + log2f(total);
        if (lane == 0) {
            p.lse[bh * seq + row] = lse2;
            if (has_teacher) {
                const float* sums = teacher_sums + 3 * r;
                p.row_kl[bh * seq + row] = sums[0] + kLn2 * (sums[2] * lse2 - sums[1]);
            }
        }
        if (!has_v) continue;
        const float inv = 1.f / total;
        for (int d = lane; d < D; d += 32) {
            out[static_cast<int64_t>(row) * p.out_strides.n + d] = from_float<T>(acc[r * Smem::LDO + d] * inv);
        }
    }
}

// fp16/bf16 forward, FlashAttention-2 style, on tensor cores. Warp w owns query rows [16w, 16w + 16) of
// the block; its Q fragments, the fp32 logits S = Q·Kᵀ and the output accumulator stay in registers in
// the mma.m16n8k16 layouts (mma_sm80.cuh): row g = lane / 4 (and g + 8) of each 8-column block is held
// by the 4 lanes of a quad, so the online softmax reduces a row with two __shfl_xor_sync, and S's
// accumulators, rounded to T, are already P·V's A fragments. K and V tiles are double-buffered in
// shared memory: cp.async fetches tile j + 1 while tile j is used.
template <typename T, int D, int BM, int BN>
struct MmaForwardSmem {
    // Rows of 2·(D + 8) bytes: 16-byte aligned for ldmatrix and cp.async, and the 8 rows an ldmatrix
    // reads at once start in 8 distinct 4-bank groups.
    static constexpr int LD = Pad<D>::kInput;
    enum { kQ, kK, kV };  // K and V: two buffers of BN rows each
    static constexpr Carving<3> kCarving =
        carve({tile_bytes<T>(BM, LD), 2 * tile_bytes<T>(BN, LD), 2 * tile_bytes<T>(BN, LD)});
    static_assert(kCarving.bytes <= kMaxSmem, "forward tiles exceed the shared-memory budget");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) mma_forward_kernel(const ForwardParams p) {
    constexpr int THREADS = BM / 16 * 32;
    constexpr int K_STEPS = D / 16;   // 16-wide k steps of Q·Kᵀ
    constexpr int S_BLOCKS = BN / 8;  // 8-key column blocks of S
    constexpr int O_BLOCKS = D / 8;   // 8-wide column blocks of the output
    using Smem = MmaForwardSmem<T, D, BM, BN>;
    constexpr int LD = Smem::LD;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* q_tile = region<T>(smem, kAt, Smem::kQ);
    T* k_tiles = region<T>(smem, kAt, Smem::kK);
    T* v_tiles = region<T>(smem, kAt, Smem::kV);

    const int seq = p.shape.seq;
    const BlockPlace place = block_place(seq, p.shape.heads, BM);
    const int64_t bh = place.bh, b = place.b, h = place.h;
    const int m0 = place.first, lane = place.lane, r0 = place.band;
    const int group = lane >> 2, pair = lane & 3;         // groupID, threadID_in_group
    const int ld_row = lane & 7, ld_matrix = lane >> 3;  // the row this lane addresses for ldmatrix.x4
    const bool has_v = p.v != nullptr, has_teacher = p.teacher != nullptr;

    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
    const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h;
    const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + h * p.v_strides.h;
    const int64_t teacher_base = b * p.teacher_strides.b + h * p.teacher_strides.h;

    const int tiles = (seq + BN - 1) / BN;
    load_rows_async<T, D, BM, THREADS>(q_tile, q, p.q_strides.n, m0, seq);
    cp_async_commit();
    load_rows_async<T, D, BN, THREADS>(k_tiles, k, p.k_strides.n, 0, seq);
    if (has_v) load_rows_async<T, D, BN, THREADS>(v_tiles, v, p.v_strides.n, 0, seq);
    cp_async_commit();
    cp_async_wait<1>();  // Q has landed; the first K, V tiles may still be in flight
    __syncthreads();

    uint32_t q_frag[K_STEPS][4];
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks) {
        // Matrix m: rows 8·(m & 1), columns 16·ks + 8·(m >> 1) of the band, i.e. a0a1, a2a3, a4a5, a6a7.
        ldmatrix_x4(q_frag[ks], q_tile + (r0 + (ld_matrix & 1) * 8 + ld_row) * LD + ks * 16 + (ld_matrix >> 1) * 8);
    }
    float o[O_BLOCKS][4];
#pragma unroll
    for (int j = 0; j < O_BLOCKS; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    // Per row g, g + 8 of the band: the running maximum (log2 units), this lane's share of the running sum
    // and of the teacher sums Σ t·log t, Σ t·s, Σ t (KL(t ‖ A) = Σ t·log t − ln2·(Σ t·s − lse2·Σ t) needs
    // nothing else, and none of the sums depends on the running maximum).
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    float t_logt[2] = {0.f, 0.f}, t_s[2] = {0.f, 0.f}, t_sum[2] = {0.f, 0.f};

    for (int tile = 0; tile < tiles; ++tile) {
        const int n0 = tile * BN;
        const T* k_tile = k_tiles + (tile & 1) * BN * LD;
        const T* v_tile = v_tiles + (tile & 1) * BN * LD;
        if (tile + 1 < tiles) {
            // The other buffers were last read in iteration tile − 1, before its closing barrier.
            const int next = (tile + 1) & 1;
            load_rows_async<T, D, BN, THREADS>(k_tiles + next * BN * LD, k, p.k_strides.n, n0 + BN, seq);
            if (has_v) load_rows_async<T, D, BN, THREADS>(v_tiles + next * BN * LD, v, p.v_strides.n, n0 + BN, seq);
            cp_async_commit();
            cp_async_wait<1>();  // this tile's copies have landed, the next tile's may be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies of this tile are visible

        float s[S_BLOCKS][4];
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int nb = 0; nb < BN / 16; ++nb) {
#pragma unroll
            for (int ks = 0; ks < K_STEPS; ++ks) {
                // Matrix m: keys 16·nb + 8·(m >> 1), dims 16·ks + 8·(m & 1): b0b1, b2b3 of key blocks 2nb, 2nb + 1.
                uint32_t kb[4];
                ldmatrix_x4(kb, k_tile + (nb * 16 + (ld_matrix >> 1) * 8 + ld_row) * LD + ks * 16 + (ld_matrix & 1) * 8);
                const uint32_t first[2] = {kb[0], kb[1]}, second[2] = {kb[2], kb[3]};
                mma_m16n8k16<T>(s[2 * nb], q_frag[ks], first);
                mma_m16n8k16<T>(s[2 * nb + 1], q_frag[ks], second);
            }
        }

        // s[j][e]: row g + 8·(e >> 1), key n0 + 8j + 2·pair + (e & 1).
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n0 + 8 * j + 2 * pair + (e & 1);
                s[j][e] = col < seq ? s[j][e] * p.qk_scale_log2 : -INFINITY;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
            }
        }
        if (has_teacher) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = m0 + r0 + group + 8 * r;
                if (row >= seq) continue;
#pragma unroll
                for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int col = n0 + 8 * j + 2 * pair + c;
                        if (col >= seq) continue;
                        const float t = load_map(p.teacher, p.teacher_dtype,
                                                 teacher_base + row * p.teacher_strides.m + col * p.teacher_strides.n);
                        t_logt[r] += t > 0.f ? t * logf(t) : 0.f;
                        t_s[r] += t * s[j][2 * r + c];
                        t_sum[r] += t;
                    }
                }
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            // Column n0 is a real key, so the new maximum is finite from the first tile on.
            const float new_max = fmaxf(row_max[r], m);
            alpha[r] = exp2f(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = exp2f(s[j][e] - row_max[e >> 1]);
                row_sum[e >> 1] += s[j][e];
            }
        }
        if (has_v) {
#pragma unroll
            for (int j = 0; j < O_BLOCKS; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e >> 1];
            }
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                // S blocks 2kk, 2kk + 1 (C layout) are the A fragment of P for keys 16kk .. 16kk + 15.
                const uint32_t pa[4] = {pack_floats<T>(s[2 * kk][0], s[2 * kk][1]),
                                        pack_floats<T>(s[2 * kk][2], s[2 * kk][3]),
                                        pack_floats<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack_floats<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    // Matrix m: keys 16·kk + 8·(m & 1), dims 16·dp + 8·(m >> 1), read transposed: b0b1, b2b3
                    // of dim blocks 2dp, 2dp + 1.
                    uint32_t vb[4];
                    ldmatrix_x4_trans(vb, v_tile + (kk * 16 + (ld_matrix & 1) * 8 + ld_row) * LD + dp * 16 +
                                              (ld_matrix >> 1) * 8);
                    const uint32_t first[2] = {vb[0], vb[1]}, second[2] = {vb[2], vb[3]};
                    mma_m16n8k16<T>(o[2 * dp], pa, first);
                    mma_m16n8k16<T>(o[2 * dp + 1], pa, second);
                }
            }
        }
        __syncthreads();  // every warp is done with this tile's buffers before the next iteration refills them
    }

    T* out = static_cast<T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h;
    const bool pairs_aligned = reinterpret_cast<uintptr_t>(out) % 4 == 0 && p.out_strides.n % 2 == 0;
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // A row's columns are spread over the 4 lanes of its quad.
        const auto quad_sum = [](float x) {
            x += __shfl_xor_sync(0xffffffffu, x, 1);
            return x + __shfl_xor_sync(0xffffffffu, x, 2);
        };
        const float total = quad_sum(row_sum[r]);
        float sums[3] = {0.f, 0.f, 0.f};
        if (has_teacher) {
            sums[0] = quad_sum(t_logt[r]);
            sums[1] = quad_sum(t_s[r]);
            sums[2] = quad_sum(t_sum[r]);
        }
        const int row = m0 + r0 + group + 8 * r;
        if (row >= seq) continue;
        const float lse2 = row_max[r] + log2f(total);
        if (pair == 0) {
            p.lse[bh * seq + row] = lse2;
            if (has_teacher) p.row_kl[bh * seq + row] = sums[0] + kLn2 * (sums[2] * lse2 - sums[1]);
        }
        if (!has_v) continue;
        const float inv = 1.f / total;
        T* out_row = out + static_cast<int64_t>(row) * p.out_strides.n + 2 * pair;
#pragma unroll
        for (int j = 0; j < O_BLOCKS; ++j) {
            const float first = o[j][2 * r] * inv, second = o[j][2 * r + 1] * inv;
            if (pairs_aligned) {
                *reinterpret_cast<uint32_t*>(out_row + 8 * j) = pack_floats<T>(first, second);
            } else {
                out_row[8 * j] = from_float<T>(first);
                out_row[8 * j + 1] = from_float<T>(second);
            }
        }
    }
}

template <typename T, int D, int BM, int BN>
struct MapsSmem {
    static constexpr int LDT = Pad<D>::kInput, LDS = Pad<BN>::kFloat;
    enum { kQ, kK, kLogits, kAcc };
    static constexpr Carving<4> kCarving = carve({tile_bytes<T>(BM, LDT), tile_bytes<T>(BN, LDT),
                                                  tile_bytes<float>(BM, LDS), tile_bytes<float>(BM, LDS)});
    static_assert(kCarving.bytes <= kMaxSmem, "maps tiles exceed the shared-memory budget");
};

// fp32 maps: one block per (map, query block, key block): P = exp2(s − lse2), summed over the heads
// for a head-mean map, in shared memory.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) fp32_maps_kernel(const MapsParams p) {
    constexpr int THREADS = BM / 16 * 32;
    using Smem = MapsSmem<T, D, BM, BN>;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* q_tile = region<T>(smem, kAt, Smem::kQ);
    T* k_tile = region<T>(smem, kAt, Smem::kK);
    float* logits = region<float>(smem, kAt, Smem::kLogits);
    float* acc = region<float>(smem, kAt, Smem::kAcc);

    const int seq = p.shape.seq, heads = p.shape.heads;
    const int m_blocks = (seq + BM - 1) / BM, n_blocks = (seq + BN - 1) / BN;
    const int64_t tiles = int64_t{m_blocks} * n_blocks;
    const int64_t map = blockIdx.x / tiles;
    const int64_t tile = blockIdx.x % tiles;
    const int m0 = static_cast<int>(tile / n_blocks) * BM, n0 = static_cast<int>(tile % n_blocks) * BN;
    const int64_t b = p.head_mean ? map : map / heads;
    const int first_head = p.head_mean ? 0 : static_cast<int>(map % heads);
    const int num_heads = p.head_mean ? heads : 1;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;

    zero_floats<BM, BN, THREADS>(acc);
    for (int step = 0; step < num_heads; ++step) {
        const int64_t h = first_head + step;
        __syncthreads();
        load_rows<T, D, BM, THREADS>(q_tile, static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h,
                                     p.q_strides.n, m0, seq);
        load_rows<T, D, BN, THREADS>(k_tile, static_cast<const T*>(p.k) + b * p.k_strides.b + h * p.k_strides.h,
                                     p.k_strides.n, n0, seq);
        __syncthreads();
        for (int j = 0; j < BN; j += 16) {
            warp_mma<T, RowMajor, ColMajor>(q_tile + r0 * Smem::LDT, Smem::LDT, k_tile + j * Smem::LDT, Smem::LDT,
                                            logits + r0 * Smem::LDS + j, Smem::LDS, D, false);
        }
        __syncwarp();
        const float* lse = p.lse + (b * heads + h) * seq;
        for (int r = r0; r < r0 + 16; ++r) {
            const int row = m0 + r;
            if (row >= seq) break;
            const float row_lse = lse[row];
            for (int c = lane; c < BN; c += 32) {
                acc[r * Smem::LDS + c] += exp2f(logits[r * Smem::LDS + c] * p.qk_scale_log2 - row_lse);
            }
        }
    }
    __syncwarp();

    const float weight = p.head_mean ? 1.f / heads : 1.f;
    const int64_t base = b * p.attn_strides.b + (p.head_mean ? 0 : first_head * p.attn_strides.h);
    for (int r = r0; r < r0 + 16; ++r) {
        const int row = m0 + r;
        if (row >= seq) break;
        for (int c = lane; c < BN && n0 + c < seq; c += 32) {
            store_map(p.attn, p.attn_dtype, base + row * p.attn_strides.m + (n0 + c) * p.attn_strides.n,
                      acc[r * Smem::LDS + c] * weight);
        }
    }
}

// fp16/bf16 maps: one block per (map, BM query rows, BN keys); S = Q·Kᵀ in registers as in the forward,
// P = exp2(s − lse2) summed in registers over the heads of a head-mean map, then stored once. The Q and
// K tiles of head i + 1 are fetched (cp.async) while head i is used.
template <typename T, int D, int BM, int BN>
struct MmaMapsSmem {
    static constexpr int LD = Pad<D>::kInput;
    enum { kQ, kK };  // two buffers each
    static constexpr Carving<2> kCarving = carve({2 * tile_bytes<T>(BM, LD), 2 * tile_bytes<T>(BN, LD)});
    static_assert(kCarving.bytes <= kMaxSmem, "maps tiles exceed the shared-memory budget");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) mma_maps_kernel(const MapsParams p) {
    constexpr int THREADS = BM / 16 * 32;
    constexpr int S_BLOCKS = BN / 8;
    using Smem = MmaMapsSmem<T, D, BM, BN>;
    constexpr int LD = Smem::LD;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr auto kAt = Smem::kCarving;
    T* q_tiles = region<T>(smem, kAt, Smem::kQ);
    T* k_tiles = region<T>(smem, kAt, Smem::kK);

    const int seq = p.shape.seq, heads = p.shape.heads;
    const int m_blocks = (seq + BM - 1) / BM, n_blocks = (seq + BN - 1) / BN;
    const int64_t tiles = int64_t{m_blocks} * n_blocks;
    const int64_t map = blockIdx.x / tiles;
    const int64_t tile = blockIdx.x % tiles;
    const int m0 = static_cast<int>(tile / n_blocks) * BM, n0 = static_cast<int>(tile % n_blocks) * BN;
    const int64_t b = p.head_mean ? map : map / heads;
    const int first_head = p.head_mean ? 0 : static_cast<int>(map % heads);
    const int num_heads = p.head_mean ? heads : 1;
    const int lane = threadIdx.x % 32, r0 = threadIdx.x / 32 * 16;
    const int group = lane >> 2, pair = lane & 3;
    const int rows[2] = {m0 + r0 + group, m0 + r0 + group + 8};

    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + first_head * p.q_strides.h;
    const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + first_head * p.k_strides.h;
    float acc[S_BLOCKS][4];
#pragma unroll
    for (int j = 0; j < S_BLOCKS; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    load_rows_async<T, D, BM, THREADS>(q_tiles, q, p.q_strides.n, m0, seq);
    load_rows_async<T, D, BN, THREADS>(k_tiles, k, p.k_strides.n, n0, seq);
    cp_async_commit();
    for (int step = 0; step < num_heads; ++step) {
        if (step + 1 < num_heads) {
            // The other buffers were last read before the previous iteration's closing barrier.
            const int next = (step + 1) & 1;
            load_rows_async<T, D, BM, THREADS>(q_tiles + next * BM * LD, q + (step + 1) * p.q_strides.h,
                                               p.q_strides.n, m0, seq);
            load_rows_async<T, D, BN, THREADS>(k_tiles + next * BN * LD, k + (step + 1) * p.k_strides.h,
                                               p.k_strides.n, n0, seq);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* q_tile = q_tiles + (step & 1) * BM * LD;
        const T* k_tile = k_tiles + (step & 1) * BN * LD;
        float s[S_BLOCKS][4];
        warp_rows_times_rows_t<T, D, BN, LD>(s, q_tile, k_tile, r0, lane);
        const float* lse = p.lse + (b * heads + first_head + step) * seq;
        const float row_lse[2] = {rows[0] < seq ? lse[rows[0]] : 0.f, rows[1] < seq ? lse[rows[1]] : 0.f};
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] += exp2f(s[j][e] * p.qk_scale_log2 - row_lse[e >> 1]);
        }
        __syncthreads();  // every warp is done with this head's buffers before the next fetch refills them
    }

    const float weight = p.head_mean ? 1.f / heads : 1.f;
    const int64_t base = b * p.attn_strides.b + (p.head_mean ? 0 : first_head * p.attn_strides.h);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= seq) continue;
#pragma unroll
        for (int j = 0; j < S_BLOCKS; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = n0 + 8 * j + 2 * pair + c;
                if (col < seq) {
                    store_map(p.attn, p.attn_dtype, base + rows[r] * p.attn_strides.m + col * p.attn_strides.n,
                              acc[j][2 * r + c] * weight);
                }
            }
        }
    }
}

template <typename T, int D>
cudaError_t forward_typed(const ForwardParams& p, cudaStream_t stream) {
    if constexpr (std::is_same_v<T, float>) {
        constexpr int BM = Blocks<T, D>::kFwdM, BN = Blocks<T, D>::kFwdN;
        const int64_t blocks = int64_t{p.shape.batch} * p.shape.heads * ((p.shape.seq + BM - 1) / BM);
        return launch(fp32_forward_kernel<T, D, BM, BN>, blocks, BM / 16 * 32,
                      ForwardSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
    } else {
        constexpr int BM = Blocks<T, D>::kMmaFwdM, BN = Blocks<T, D>::kMmaFwdN;
        const int64_t blocks = int64_t{p.shape.batch} * p.shape.heads * ((p.shape.seq + BM - 1) / BM);
        return launch(mma_forward_kernel<T, D, BM, BN>, blocks, BM / 16 * 32,
                      MmaForwardSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
    }
}

template <typename T, int D, int BM, int BN>
int64_t maps_blocks(const MapsParams& p) {
    const int64_t maps = int64_t{p.shape.batch} * (p.head_mean ? 1 : p.shape.heads);
    return maps * ((p.shape.seq + BM - 1) / BM) * ((p.shape.seq + BN - 1) / BN);
}

template <typename T, int D>
cudaError_t maps_typed(const MapsParams& p, cudaStream_t stream) {
    if constexpr (std::is_same_v<T, float>) {
        constexpr int BM = Blocks<T, D>::kFwdM, BN = Blocks<T, D>::kFwdN;
        return launch(fp32_maps_kernel<T, D, BM, BN>, maps_blocks<T, D, BM, BN>(p), BM / 16 * 32,
                      MapsSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
    } else {
        constexpr int BM = Blocks<T, D>::kMmaFwdM, BN = Blocks<T, D>::kMmaFwdN;
        return launch(mma_maps_kernel<T, D, BM, BN>, maps_blocks<T, D, BM, BN>(p), BM / 16 * 32,
                      MmaMapsSmem<T, D, BM, BN>::kCarving.bytes, stream, p);
    }
}

template <typename T, int D>
struct ForwardOp {
    static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return forward_typed<T, D>(p, s); }
};

template <typename T, int D>
struct MapsOp {
    static cudaError_t run(const MapsParams& p, cudaStream_t s) { return maps_typed<T, D>(p, s); }
};

}  // namespace

bool supported_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t synergistic_attention_forward(const ForwardParams& params, cudaStream_t stream) {
    if (!supported_head_dim(params.shape.head_dim) || params.shape.seq < 1) return cudaErrorInvalidValue;
    return dispatch<ForwardOp>(params, stream);
}

cudaError_t synergistic_attention_maps(const MapsParams& params, cudaStream_t stream) {
    if (!supported_head_dim(params.shape.head_dim) || params.shape.seq < 1) return cudaErrorInvalidValue;
    return dispatch<MapsOp>(params, stream);
}

}  // namespace muse
