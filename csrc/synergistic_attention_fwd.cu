// Synergistic attention forward: output and row log-sum-exp (flash-style online softmax), and the
// normalized maps (per head, or averaged over heads inside one block: no atomics, and the
// (B, H, N, N) tensor never exists for head-mean maps).
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

// One block per (batch·head, query block); warp w owns query rows [16w, 16w + 16).
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) forward_kernel(const ForwardParams p) {
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

template <typename T, int D, int BM, int BN>
struct MapsSmem {
    static constexpr int LDT = Pad<D>::kInput, LDS = Pad<BN>::kFloat;
    enum { kQ, kK, kLogits, kAcc };
    static constexpr Carving<4> kCarving = carve({tile_bytes<T>(BM, LDT), tile_bytes<T>(BN, LDT),
                                                  tile_bytes<float>(BM, LDS), tile_bytes<float>(BM, LDS)});
    static_assert(kCarving.bytes <= kMaxSmem, "maps tiles exceed the shared-memory budget");
};

// One block per (map, query block, key block): P = exp2(s − lse2), summed over the heads for a
// head-mean map.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) maps_kernel(const MapsParams p) {
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

template <typename T, int D>
cudaError_t forward_typed(const ForwardParams& p, cudaStream_t stream) {
    constexpr int BM = Blocks<T, D>::kFwdM, BN = Blocks<T, D>::kFwdN;
    const int64_t blocks = int64_t{p.shape.batch} * p.shape.heads * ((p.shape.seq + BM - 1) / BM);
    return launch(forward_kernel<T, D, BM, BN>, blocks, BM / 16 * 32, ForwardSmem<T, D, BM, BN>::kCarving.bytes,
                  stream, p);
}

template <typename T, int D>
cudaError_t maps_typed(const MapsParams& p, cudaStream_t stream) {
    constexpr int BM = Blocks<T, D>::kFwdM, BN = Blocks<T, D>::kFwdN;
    const int64_t maps = int64_t{p.shape.batch} * (p.head_mean ? 1 : p.shape.heads);
    const int64_t blocks = maps * ((p.shape.seq + BM - 1) / BM) * ((p.shape.seq + BN - 1) / BN);
    return launch(maps_kernel<T, D, BM, BN>, blocks, BM / 16 * 32, MapsSmem<T, D, BM, BN>::kCarving.bytes, stream,
                  p);
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
