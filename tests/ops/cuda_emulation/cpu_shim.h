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
// What this checks: the kernels' indexing, masking, tiling, shared-memory carving, barrier structure
// (a barrier not reached by every thread deadlocks) and the host-side dispatch. What it cannot check:
// real tensor-core numerics, fragment layouts, memory-model subtleties and performance.
#pragma once

#include <barrier>
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

struct Block {
    explicit Block(int threads) : all(threads), exchange(threads) {
        for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    }
    std::barrier<> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> exchange;
};

inline thread_local Block* current = nullptr;

}  // namespace emu

inline void __syncthreads() { emu::current->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::current->warps[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    emu::Block& block = *emu::current;
    block.exchange[threadIdx.x] = value;
    __syncwarp();
    const float other = block.exchange[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask))];
    __syncwarp();  // nobody overwrites the buffer before every lane has read it
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
