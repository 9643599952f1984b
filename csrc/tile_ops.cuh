// Device building blocks shared by the forward and backward kernels.
//
// Every kernel gives each warp a band of 16 rows. The fp16/bf16 forward keeps its operands in
// registers in the mma.m16n8k16 fragment layouts (mma_sm80.cuh). The other kernels keep their tiles in
// shared memory and compute products 16×16 output block by 16×16 output block (`warp_mma`): on tensor
// cores through WMMA for fp16 and bf16 inputs (fp32 accumulation), with FMA for fp32 inputs, which
// keeps fp32 exact to IEEE rounding (TF32 would fail the fp32 accuracy contract the Triton backend
// meets). Their accumulators live in shared memory, so the softmax rescaling and masking are plain
// indexed code, independent of the opaque WMMA fragment layouts.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "mma_sm80.cuh"
#include "synergistic_attention.h"

namespace muse {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Maps and their gradients are fp32 or bf16, chosen at run time (a uniform branch).
__device__ __forceinline__ float load_map(const void* base, DType dtype, int64_t index) {
    if (dtype == DType::kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    return static_cast<const float*>(base)[index];
}

__device__ __forceinline__ void store_map(void* base, DType dtype, int64_t index, float value) {
    if (dtype == DType::kBFloat16) {
        static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value);
    } else {
        static_cast<float*>(base)[index] = value;
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Shared-memory leading dimensions, padded against bank conflicts; the padding keeps every 16-row
// and 16-column block 32-byte aligned, as WMMA loads and stores require.
template <int COLS>
struct Pad {
    static constexpr int kInput = COLS + 8;  // fp16/bf16/fp32 input tiles
    static constexpr int kFloat = COLS + 4;  // fp32 accumulators and logits
};

constexpr int64_t round_up_128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// A dynamic shared-memory buffer carved into 128-byte aligned arrays of the given sizes; constexpr,
// so that the host launches with exactly the size the kernel uses.
template <int N>
struct Carving {
    int64_t offset[N];
    int64_t bytes;
};

template <int N>
constexpr Carving<N> carve(const int64_t (&sizes)[N]) {
    Carving<N> carving{};
    int64_t at = 0;
    for (int i = 0; i < N; ++i) {
        carving.offset[i] = at;
        at = round_up_128(at + sizes[i]);
    }
    carving.bytes = at;
    return carving;
}

// Region `index` of a block's shared memory, typed.
template <typename U, int N>
__device__ __forceinline__ U* region(unsigned char* smem, const Carving<N>& carving, int index) {
    return reinterpret_cast<U*>(smem + carving.offset[index]);
}

template <typename T>
constexpr int64_t tile_bytes(int rows, int ld) {
    return int64_t{rows} * ld * static_cast<int64_t>(sizeof(T));
}

// Where a block stands: its (batch, head) slice and the first of its `block_rows` rows (query rows
// for the forward and dQ kernels, key rows for dK/dV), and the 16-row band of this warp.
struct BlockPlace {
    int64_t bh, b, h;
    int first, lane, band;
};

__device__ __forceinline__ BlockPlace block_place(int seq, int heads, int block_rows) {
    const int blocks = (seq + block_rows - 1) / block_rows;
    BlockPlace place;
    place.bh = blockIdx.x / blocks;
    place.first = static_cast<int>(blockIdx.x % blocks) * block_rows;
    place.b = place.bh / heads;
    place.h = place.bh % heads;
    place.lane = threadIdx.x % 32;
    place.band = threadIdx.x / 32 * 16;
    return place;
}

// (ROWS × D) tile of a (B, H, N, D) tensor's (b, h) slice, rows from `first`, zero past `seq`. 16-byte
// loads and stores when the slice and its row stride allow them (the padded tile rows always do),
// element by element otherwise.
template <typename T>
__device__ __forceinline__ bool rows_are_vectors(const T* slice, int64_t row_stride) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    return reinterpret_cast<uintptr_t>(slice) % 16 == 0 && row_stride % VEC == 0;
}

template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(T* tile, const T* slice, int64_t row_stride, int first, int seq) {
    constexpr int LD = Pad<D>::kInput;
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    static_assert(D % VEC == 0 && (LD * sizeof(T)) % 16 == 0, "tile rows must hold whole 16-byte vectors");
    if (rows_are_vectors(slice, row_stride)) {
        for (int i = threadIdx.x; i < ROWS * (D / VEC); i += THREADS) {
            const int r = i / (D / VEC), d = i % (D / VEC) * VEC;
            const int row = first + r;
            uint4 value = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: 0.0 in fp32, fp16 and bf16 alike
            if (row < seq) value = *reinterpret_cast<const uint4*>(slice + static_cast<int64_t>(row) * row_stride + d);
            *reinterpret_cast<uint4*>(tile + r * LD + d) = value;
        }
        return;
    }
    for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
        const int r = i / D, d = i % D;
        const int row = first + r;
        tile[r * LD + d] = row < seq ? slice[static_cast<int64_t>(row) * row_stride + d] : from_float<T>(0.f);
    }
}

// load_rows through cp.async (16-byte copies, zero-filled past `seq`): in flight until the caller's
// cp_async_wait; element by element, synchronously, when the slice's rows are not 16-byte vectors.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows_async(T* tile, const T* slice, int64_t row_stride, int first, int seq) {
    constexpr int LD = Pad<D>::kInput;
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    static_assert(D % VEC == 0 && (LD * sizeof(T)) % 16 == 0, "tile rows must hold whole 16-byte vectors");
    if (!rows_are_vectors(slice, row_stride)) {
        load_rows<T, D, ROWS, THREADS>(tile, slice, row_stride, first, seq);
        return;
    }
    for (int i = threadIdx.x; i < ROWS * (D / VEC); i += THREADS) {
        const int r = i / (D / VEC), d = i % (D / VEC) * VEC;
        const int row = first + r;
        const bool inside = row < seq;
        cp_async_16(tile + r * LD + d, inside ? slice + static_cast<int64_t>(row) * row_stride + d : slice, inside);
    }
}

template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void zero_floats(float* tile) {
    constexpr int LD = Pad<COLS>::kFloat;
    for (int i = threadIdx.x; i < ROWS * COLS; i += THREADS) tile[(i / COLS) * LD + i % COLS] = 0.f;
}

struct RowMajor {};
struct ColMajor {};

template <typename L>
struct Wmma;
template <>
struct Wmma<RowMajor> {
    using type = nvcuda::wmma::row_major;
};
template <>
struct Wmma<ColMajor> {
    using type = nvcuda::wmma::col_major;
};

// Element (i, j) of a matrix stored with leading dimension ld in layout L.
template <typename L>
__device__ __forceinline__ int64_t at(int i, int j, int ld) {
    if constexpr (std::is_same_v<L, RowMajor>) {
        return static_cast<int64_t>(i) * ld + j;
    } else {
        return static_cast<int64_t>(j) * ld + i;
    }
}

// C[16×16] (+)= A[16×K] · B[K×16], one warp. A, B in shared memory in layouts LA, LB; C fp32,
// row-major, in shared memory. Callers __syncwarp() before other lanes read C.
template <typename T, typename LA, typename LB>
__device__ __forceinline__ void warp_mma(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int k_dim,
                                         bool accumulate) {
    if constexpr (std::is_same_v<T, float>) {
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const int e = lane + 32 * t;
            const int i = e / 16, j = e % 16;
            float acc = accumulate ? c[i * ldc + j] : 0.f;
            for (int kk = 0; kk < k_dim; ++kk) acc = fmaf(a[at<LA>(i, kk, lda)], b[at<LB>(kk, j, ldb)], acc);
            c[i * ldc + j] = acc;
        }
    } else {
        using namespace nvcuda;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) {
            wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
        } else {
            wmma::fill_fragment(acc, 0.f);
        }
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, typename Wmma<LA>::type> frag_a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, typename Wmma<LB>::type> frag_b;
        for (int kk = 0; kk < k_dim; kk += 16) {
            wmma::load_matrix_sync(frag_a, a + at<LA>(0, kk, lda), lda);
            wmma::load_matrix_sync(frag_b, b + at<LB>(kk, 0, ldb), ldb);
            wmma::mma_sync(acc, frag_a, frag_b, acc);
        }
        wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    }
}

// s = A·Bᵀ for the warp's 16 rows [r0, r0 + 16) of `a_tile` and the BN rows of `b_tile` (both row-major,
// D wide, leading dimension LD, in shared memory), as mma.m16n8k16 C fragments: s[j] holds columns
// [8j, 8j + 8). A's fragments are loaded per k step (not held), B's by ldmatrix.x4 two column blocks at a
// time: matrix m holds B rows 16·nb + 8·(m >> 1), columns 16·ks + 8·(m & 1), i.e. b0b1, b2b3 of blocks
// 2nb, 2nb + 1.
template <typename T, int D, int BN, int LD>
__device__ __forceinline__ void warp_rows_times_rows_t(float (&s)[BN / 8][4], const T* a_tile, const T* b_tile,
                                                       int r0, int lane) {
    const int ld_row = lane & 7, ld_matrix = lane >> 3;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, a_tile + (r0 + (ld_matrix & 1) * 8 + ld_row) * LD + ks * 16 + (ld_matrix >> 1) * 8);
#pragma unroll
        for (int nb = 0; nb < BN / 16; ++nb) {
            uint32_t bb[4];
            ldmatrix_x4(bb, b_tile + (nb * 16 + (ld_matrix >> 1) * 8 + ld_row) * LD + ks * 16 + (ld_matrix & 1) * 8);
            const uint32_t first[2] = {bb[0], bb[1]}, second[2] = {bb[2], bb[3]};
            mma_m16n8k16<T>(s[2 * nb], a, first);
            mma_m16n8k16<T>(s[2 * nb + 1], a, second);
        }
    }
}

// Kernel configurations: query block BM, key block BN per (input type, head dim). Chosen so that
// every kernel fits in 99 KB of shared memory (sm_80 and sm_86/89 alike).
template <typename T, int D>
struct Blocks {
    static constexpr bool kWide = sizeof(T) == 2;
    // The fp16/bf16 forward (registers, not shared memory, hold its accumulators): 4 warps.
    static constexpr int kMmaFwdM = 64, kMmaFwdN = 64;
    static constexpr int kMmaDqM = 64, kMmaDqN = D == 64 ? 64 : 32;
    static constexpr int kMmaDkvM = 64, kMmaDkvN = 64;  // D = 64 only (see BackwardOp)
    static constexpr int kFwdM = (kWide && D == 64) ? 64 : 32;
    static constexpr int kFwdN = (!kWide && D == 128) ? 32 : 64;
    static constexpr int kDqM = (kWide && D == 64) ? 64 : ((!kWide && D == 128) ? 16 : 32);
    static constexpr int kDqN = (!kWide && D == 128) ? 32 : 64;
    static constexpr int kDkvM = (!kWide && D == 128) ? 16 : 32;
    static constexpr int kDkvN = (kWide && D == 64) ? 64 : 32;
};

constexpr int64_t kMaxSmem = 99 * 1024;

// ---------------------------------------------------------------------------------------- host side

// One 1-D grid (the (batch, head) count is not bounded by the 65535 limit of grid axes 1 and 2).
template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, int64_t blocks, int threads, int64_t smem_bytes, cudaStream_t stream,
                   const Params& params) {
#ifdef MUSE_CPU_EMULATION
    // The CPU test harness (tests/ops/cuda_emulation) runs the grid with one host thread per CUDA thread.
    return emulate_launch(kernel, blocks, threads, smem_bytes, stream, params);
#else
    if (smem_bytes > 48 * 1024) {
        const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
        if (err != cudaSuccess) return err;
    }
    kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, stream>>>(params);
    return cudaGetLastError();
#endif
}

// Op<T, D>::run(params, stream) for the input dtype and head dim of `params`.
template <template <typename, int> class Op, typename Params>
cudaError_t dispatch(const Params& p, cudaStream_t stream) {
    const int d = p.shape.head_dim;
    switch (p.dtype) {
        case DType::kFloat32:
            return d == 64 ? Op<float, 64>::run(p, stream) : Op<float, 128>::run(p, stream);
        case DType::kFloat16:
            return d == 64 ? Op<__half, 64>::run(p, stream) : Op<__half, 128>::run(p, stream);
        case DType::kBFloat16:
            return d == 64 ? Op<__nv_bfloat16, 64>::run(p, stream) : Op<__nv_bfloat16, 128>::run(p, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace muse
