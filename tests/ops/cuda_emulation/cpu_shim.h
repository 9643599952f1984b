// Runs the CUDA backend's kernels on the CPU, for the test suite on machines without a GPU.
//
// Force-included before csrc/*.cu, compiled as C++20 by the host compiler: every CUDA thread of a block
// is a host thread; __syncthreads and __syncwarp are barriers; warp shuffles go through a per-warp
// exchange buffer; WMMA fragments hold whole 16×16 tiles (each lane computes the tile product in fp32,
// lane 0 stores it, as the hardware's warp-collective store writes it once). Built with
// -fsanitize=thread, the harness reports data races between the emulated threads. Blocks run one after
// another over one dynamic shared-memory buffer, filled with NaN bytes before each block so that a
// read of shared memory the kernel never wrote shows up in the results.
//
// The register-level tensor-core instructions of csrc/mma_sm80.cuh (ldmatrix, mma.sync m16n8k16,
// cp.async) are emulated per lane, after the PTX ISA's fragment layouts (§9.7.14.5.8 "Matrix Fragments
// for mma.m16n8k16 with floating point type", §9.7.14.5.15 "ldmatrix"): each lane contributes exactly
// the registers (or row address) the hardware takes from it, the warp's operands are rebuilt from the
// 32 lanes' registers through the exchange buffer, and each lane receives exactly the elements the
// hardware hands it. A kernel that puts a wrong element into a fragment register therefore computes
// wrong numbers here, as it would on a GPU.
//
// What this checks: the kernels' indexing, masking, tiling, shared-memory carving, barrier structure
// (a barrier not reached by every thread deadlocks), the mma/ldmatrix fragment layouts and the
// host-side dispatch. What it cannot check: real tensor-core rounding (here: fp32 FMAs in k order),
// WMMA's opaque layouts, cp.async's asynchrony (here: a plain copy, complete at once), memory-model
// subtleties and performance.
#pragma once

#include <array>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The CUDA headers give these host-compiler meanings; here they are plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct EmuIndex {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuIndex threadIdx;
inline thread_local EmuIndex blockIdx;

namespace emu {

constexpr int64_t kSmemBytes = 256 * 1024;
constexpr size_t kSlotBytes = 32;  // the most one lane hands a warp-collective operation (mma: 6 words)

using Slot = std::array<unsigned char, kSlotBytes>;

struct Block {
    explicit Block(int threads) : all(threads), exchange{std::vector<Slot>(threads), std::vector<Slot>(threads)} {
        for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    }
    std::barrier<> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // Two banks, used alternately by a warp's successive collective operations: a lane writes bank b
    // again only two operations later, after the barrier of the operation in between, which every lane
    // reaches only once it has read bank b. One barrier per operation instead of two.
    std::vector<Slot> exchange[2];
};

inline thread_local Block* current = nullptr;
inline thread_local unsigned exchange_round = 0;  // the same sequence in every lane of a warp

}  // namespace emu

inline void __syncwarp(unsigned = 0xffffffffu);

namespace emu {

// Lane `value`s of the whole warp, as the hardware gathers them for a collective operation.
template <typename V>
std::array<V, 32> warp_gather(const V& value) {
    static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= kSlotBytes);
    std::vector<Slot>& bank = current->exchange[exchange_round++ & 1u];
    std::memcpy(bank[threadIdx.x].data(), &value, sizeof(V));
    __syncwarp();
    std::array<V, 32> lanes;
    const unsigned first = threadIdx.x & ~31u;
    for (unsigned lane = 0; lane < 32; ++lane) std::memcpy(&lanes[lane], bank[first + lane].data(), sizeof(V));
    return lanes;
}

}  // namespace emu

inline void __syncthreads() { emu::current->all.arrive_and_wait(); }
inline void __syncwarp(unsigned) { emu::current->warps[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    std::vector<emu::Slot>& bank = emu::current->exchange[emu::exchange_round++ & 1u];
    std::memcpy(bank[threadIdx.x].data(), &value, sizeof(value));
    __syncwarp();
    float other;
    std::memcpy(&other, bank[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask))].data(),
                sizeof(other));
    return other;
}

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    float x[16][16];
};

inline float emu_to_float(float v) { return v; }
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P* p, unsigned ldm) {
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j)
            f.x[i][j] = emu_to_float(std::is_same_v<Layout, col_major> ? p[j * ldm + i] : p[i * ldm + j]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t) {
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) f.x[i][j] = p[i * ldm + j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
    // On the hardware each element of a tile is loaded and stored by the same lane, so a warp may store
    // over the tile it has just loaded; here every lane loaded every element, so wait for all of them.
    __syncwarp();
    if (threadIdx.x % 32 != 0) return;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.x[i][j];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
    for (auto& row : f.x)
        for (float& v : row) v = value;
}

template <typename A, typename B>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    float result[16][16];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            float acc = c.x[i][j];
            for (int k = 0; k < 16; ++k) acc = std::fma(a.x[i][k], b.x[k][j], acc);
            result[i][j] = acc;
        }
    std::memcpy(d.x, result, sizeof(result));
}

}  // namespace nvcuda::wmma

namespace muse {
namespace {
// The kernels' `extern __shared__ unsigned char smem[]` (block-scope extern declarations) name this.
alignas(128) unsigned char smem[emu::kSmemBytes];
}  // namespace

}  // namespace muse

namespace emu {

[[noreturn]] inline void fail(const char* what, const void* address) {
    std::fprintf(stderr, "emulated %s: address %p is not a 16-byte aligned shared-memory row\n", what, address);
    std::abort();
}

// ldmatrix and cp.async take 16-byte aligned shared-memory addresses; anything else is an error on the
// hardware (misaligned address or undefined behaviour), so it stops the emulation.
inline void check_shared_row(const void* address, const char* what) {
    const auto* at = static_cast<const unsigned char*>(address);
    if (at < muse::smem || at + 16 > muse::smem + kSmemBytes || reinterpret_cast<uintptr_t>(at) % 16 != 0) {
        fail(what, address);
    }
}

inline uint16_t half_word(uint32_t word, int index) { return static_cast<uint16_t>(word >> (16 * index)); }

inline float b16_to_float(uint16_t bits, __half*) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

inline float b16_to_float(uint16_t bits, __nv_bfloat16*) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
}

// ldmatrix.sync.aligned.m8n8.x{MATRICES}[.trans].shared.b16: lane i gives the address of row i % 8 of
// matrix i / 8 (lanes 0..8·MATRICES−1 only); register m of lane i receives, of matrix m, the elements
// (i / 4, 2·(i % 4) + {0, 1}) without .trans, and (2·(i % 4) + {0, 1}, i / 4) of the stored rows with
// .trans (the matrix is read column-major), the first element in the low half.
template <int MATRICES, bool TRANS>
void ldmatrix(uint32_t* regs, const void* row_address) {
    const unsigned lane = threadIdx.x % 32;
    if (lane < 8 * MATRICES) check_shared_row(row_address, "ldmatrix");
    const std::array<const void*, 32> rows = warp_gather(row_address);
    const int group = static_cast<int>(lane >> 2), pair = static_cast<int>(lane & 3);
    for (int m = 0; m < MATRICES; ++m) {
        uint32_t word = 0;
        for (int j = 0; j < 2; ++j) {
            const int row = TRANS ? 2 * pair + j : group, col = TRANS ? group : 2 * pair + j;
            uint16_t element;
            std::memcpy(&element, static_cast<const unsigned char*>(rows[8 * m + row]) + 2 * col, sizeof(element));
            word |= static_cast<uint32_t>(element) << (16 * j);
        }
        regs[m] = word;
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A·B + C in place. With
// groupID g = lane / 4 and threadID_in_group t = lane % 4, the PTX ISA places
//   A (16×16, 4 regs, elements a0..a7): row g (+8 for a2, a3, a6, a7), col 2t + (i & 1) (+8 for i ≥ 4);
//   B (16×8, 2 regs, b0..b3):           row (k) 2t + (i & 1) (+8 for i ≥ 2), col (n) g;
//   C, D (16×8, 4 floats, c0..c3):      row g (+8 for i ≥ 2), col 2t + (i & 1).
// The warp's A and B are rebuilt from every lane's registers by these rules; each lane then computes its
// own four D elements (fp32 FMAs in k order: the products of 16-bit inputs are exact in fp32, the
// hardware's accumulation order and rounding are not modelled).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    struct Operands {
        uint32_t a[4], b[2];
    };
    const std::array<Operands, 32> lanes = warp_gather(Operands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}});
    float a_full[16][16], b_full[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = g + ((i & 2) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
            a_full[row][col] = b16_to_float(half_word(lanes[lane].a[i / 2], i & 1), static_cast<T*>(nullptr));
        }
        for (int i = 0; i < 4; ++i) {
            const int k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
            b_full[k][g] = b16_to_float(half_word(lanes[lane].b[i / 2], i & 1), static_cast<T*>(nullptr));
        }
    }
    const int lane = static_cast<int>(threadIdx.x % 32), g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc = std::fma(a_full[row][k], b_full[k][col], acc);
        d[i] = acc;
    }
}

// cp.async.cg.shared.global with 16 bytes, all (16) or none (0: zero fill) of them read: complete at once.
// Constant-size copies only: with a variable-size memset/memcpy pair here, g++ -O1 produced code whose
// shared-memory write ThreadSanitizer did not see, so a deleted barrier before a cp.async refill went
// unreported; constant-size copies are instrumented as plain 16-byte accesses.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
    check_shared_row(dst, "cp.async");
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source", src);
    unsigned char bytes[16] = {};
    if (src_bytes == 16) std::memcpy(bytes, src, 16);
    std::memcpy(dst, bytes, 16);
}

}  // namespace emu

namespace muse {

template <typename Kernel, typename Params>
cudaError_t emulate_launch(Kernel kernel, int64_t blocks, int threads, int64_t smem_bytes, cudaStream_t,
                           const Params& params) {
    if (smem_bytes > emu::kSmemBytes || threads % 32 != 0) return cudaErrorInvalidConfiguration;
    for (int64_t b = 0; b < blocks; ++b) {
        std::memset(smem, 0xff, sizeof(smem));  // NaN floats, NaN halves: unwritten reads stand out
        emu::Block block(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                threadIdx.x = static_cast<unsigned>(t);
                blockIdx.x = static_cast<unsigned>(b);
                emu::current = &block;
                kernel(params);
            });
        }
        for (auto& thread : pool) thread.join();
    }
    return cudaSuccess;
}

}  // namespace muse
