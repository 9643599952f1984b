// Register-level tensor-core building blocks (sm_80 and later): ldmatrix, mma.sync m16n8k16 with fp32
// accumulators, cp.async. Fragment layouts are the PTX ISA's (§9.7.14.5.8 "Matrix Fragments for
// mma.m16n8k16 with floating point type", §9.7.14.5.15 "ldmatrix"); with groupID g = lane / 4 and
// threadID_in_group t = lane % 4:
//   A (16×16, 4 × b32 = a0..a7): row g (+8 for a2, a3, a6, a7), col 2t + (i & 1) (+8 for i ≥ 4);
//   B (16×8,  2 × b32 = b0..b3): row (k) 2t + (i & 1) (+8 for i ≥ 2), col (n) g;
//   C, D (16×8, 4 floats c0..c3): row g (+8 for i ≥ 2), col 2t + (i & 1).
// ldmatrix.m8n8: lane i gives the address of row i % 8 of matrix i / 8; register m of lane i receives
// row g, columns 2t, 2t + 1 of matrix m (.trans: rows 2t, 2t + 1 of column g).
//
// Under MUSE_CPU_EMULATION (the CPU test harness, tests/ops/cuda_emulation/cpu_shim.h) each of these
// is emulated per lane with the same layouts, so a wrong fragment index gives wrong numbers on the CPU.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace muse {

// Two values as one b32 fragment register, `low` in the low half (element i & 1 == 0).
__device__ __forceinline__ uint32_t pack_pair(__half low, __half high) {
    uint16_t lo, hi;
    std::memcpy(&lo, &low, sizeof(lo));
    std::memcpy(&hi, &high, sizeof(hi));
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

__device__ __forceinline__ uint32_t pack_pair(__nv_bfloat16 low, __nv_bfloat16 high) {
    uint16_t lo, hi;
    std::memcpy(&lo, &low, sizeof(lo));
    std::memcpy(&hi, &high, sizeof(hi));
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float low, float high);
template <>
__device__ __forceinline__ uint32_t pack_floats<__half>(float low, float high) {
    return pack_pair(__float2half_rn(low), __float2half_rn(high));
}
template <>
__device__ __forceinline__ uint32_t pack_floats<__nv_bfloat16>(float low, float high) {
    return pack_pair(__float2bfloat16_rn(low), __float2bfloat16_rn(high));
}

#ifdef MUSE_CPU_EMULATION

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) { emu::ldmatrix<1, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) { emu::ldmatrix<2, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu::ldmatrix<4, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) { emu::ldmatrix<1, true>(r, row); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { emu::ldmatrix<2, true>(r, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emu::ldmatrix<4, true>(r, row); }

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    emu::mma_m16n8k16<T>(d, a, b);
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
    emu::cp_async_16(dst, src, fill ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() {}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {}

#else

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16 bytes global → shared, bypassing L1; `fill` false writes 16 zero bytes and reads nothing (the
// src-size operand), so rows past the sequence end need no branch around the copy.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(fill ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most PENDING of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

#endif

}  // namespace muse
