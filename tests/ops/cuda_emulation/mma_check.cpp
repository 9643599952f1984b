// Checks the emulated tensor-core primitives of csrc/mma_sm80.cuh (ldmatrix x1/x2/x4 with and without
// .trans, mma.sync m16n8k16 for f16 and bf16, cp.async) on one emulated warp: D = A·B + C through
// fragments loaded in the PTX ISA's layouts equals the plain product, and fragments loaded in a wrong
// layout give a wrong product. Inputs are small integers, so every result is exact in fp32 and is
// compared bit for bit. Prints "ok <check>" per passing check; exits 1 on the first failure.
// `mma_check misaligned` issues an ldmatrix from a misaligned row, which must stop the emulation.
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <iterator>
#include <random>
#include <string>
#include <utility>

#include "mma_sm80.cuh"

namespace muse {
namespace {

constexpr int LD = 24;  // padded rows of the shared tiles: 48 bytes, every row 16-byte aligned

enum class Load {
    kLdmatrix,          // A: ldmatrix.x4 (row-major A); B: ldmatrix.x2 (B stored n-major, Kᵀ style)
    kLdmatrixTrans,     // A: ldmatrix.x4.trans (Aᵀ stored); B: ldmatrix.x2.trans (B stored k-major, V style)
    kSingleMatrices,    // A: four ldmatrix.x1; B: two ldmatrix.x1.trans
    kFromFormulas,      // registers filled from global memory by the PTX layout formulas, no ldmatrix
    kRowHalvesSwapped,  // wrong: A's a0a1 ↔ a2a3 and a4a5 ↔ a6a7 (rows g and g + 8 exchanged)
    kMatricesInColumnOrder,  // wrong: ldmatrix.x4 lanes address A's 8×8 blocks column-first (a2a3 ↔ a4a5)
};

struct Case {
    const float* a;  // 16×16, row-major
    const float* b;  // 16×8 (k × n), row-major
    const float* c;  // 16×8, row-major
    float* d;        // 16×8, row-major
    Load load;
};

template <typename T>
T to_input(float x) {
    if constexpr (std::is_same_v<T, __half>) {
        return __float2half_rn(x);
    } else {
        return __float2bfloat16_rn(x);
    }
}

template <typename T>
void product_kernel(const Case& c) {
    T* a_tile = reinterpret_cast<T*>(smem);  // A, 16 rows
    T* at_tile = a_tile + 16 * LD;           // Aᵀ, 16 rows
    T* bn_tile = at_tile + 16 * LD;          // Bᵀ: 8 rows (n) of 16 (k)
    T* bk_tile = bn_tile + 8 * LD;           // B: 16 rows (k) of 8 (n)
    const int lane = static_cast<int>(threadIdx.x), g = lane >> 2, t = lane & 3;
    for (int i = lane; i < 256; i += 32) {
        a_tile[(i / 16) * LD + i % 16] = to_input<T>(c.a[i]);
        at_tile[(i % 16) * LD + i / 16] = to_input<T>(c.a[i]);
    }
    for (int i = lane; i < 128; i += 32) {
        bn_tile[(i % 8) * LD + i / 8] = to_input<T>(c.b[i]);
        bk_tile[(i / 8) * LD + i % 8] = to_input<T>(c.b[i]);
    }
    __syncwarp();

    uint32_t a[4], b[2];
    const int matrix = lane >> 3, row = lane & 7;
    switch (c.load) {
        case Load::kLdmatrix:
        case Load::kRowHalvesSwapped:
            // Matrix m of A: rows 8·(m & 1), columns 8·(m >> 1); of Bᵀ: k columns 8·m.
            ldmatrix_x4(a, a_tile + ((matrix & 1) * 8 + row) * LD + (matrix >> 1) * 8);
            ldmatrix_x2(b, bn_tile + row * LD + (matrix & 1) * 8);
            if (c.load == Load::kRowHalvesSwapped) {
                std::swap(a[0], a[1]);
                std::swap(a[2], a[3]);
            }
            break;
        case Load::kMatricesInColumnOrder:
            ldmatrix_x4(a, a_tile + ((matrix >> 1) * 8 + row) * LD + (matrix & 1) * 8);
            ldmatrix_x2(b, bn_tile + row * LD + (matrix & 1) * 8);
            break;
        case Load::kLdmatrixTrans:
            // Aᵀ's matrix m holds A's columns 8·(m >> 1), rows 8·(m & 1); B's matrix m holds k rows 8·m.
            ldmatrix_x4_trans(a, at_tile + ((matrix >> 1) * 8 + row) * LD + (matrix & 1) * 8);
            ldmatrix_x2_trans(b, bk_tile + ((matrix & 1) * 8 + row) * LD);
            break;
        case Load::kSingleMatrices:
            for (int m = 0; m < 4; ++m) {
                uint32_t one[1];
                ldmatrix_x1(one, a_tile + ((m & 1) * 8 + row) * LD + (m >> 1) * 8);
                a[m] = one[0];
            }
            for (int m = 0; m < 2; ++m) {
                uint32_t one[1];
                ldmatrix_x1_trans(one, bk_tile + (m * 8 + row) * LD);
                b[m] = one[0];
            }
            break;
        case Load::kFromFormulas:
            for (int r = 0; r < 4; ++r) {
                const int at_row = g + (r & 1) * 8, at_col = 2 * t + (r >> 1) * 8;
                a[r] = pack_floats<T>(c.a[at_row * 16 + at_col], c.a[at_row * 16 + at_col + 1]);
            }
            for (int r = 0; r < 2; ++r) {
                const int k = 2 * t + r * 8;
                b[r] = pack_floats<T>(c.b[k * 8 + g], c.b[(k + 1) * 8 + g]);
            }
            break;
    }
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = c.c[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)];
    mma_m16n8k16<T>(d, a, b);
    for (int i = 0; i < 4; ++i) c.d[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)] = d[i];
}

struct CopyCase {
    const unsigned char* source;  // 32 bytes, 16-byte aligned
    unsigned char* result;        // 32 bytes
};

void copy_kernel(const CopyCase& c) {
    if (threadIdx.x == 0) {
        cp_async_16(smem, c.source, true);
        cp_async_16(smem + 16, c.source + 16, false);
        cp_async_commit();
        cp_async_wait<0>();
        std::memcpy(c.result, smem, 32);
    }
}

void misaligned_kernel(const int&) {
    uint32_t r[4];
    ldmatrix_x4(r, smem + 8 + 16 * (threadIdx.x % 32));
}

int failures = 0;

void check(bool ok, const std::string& name) {
    std::printf("%s %s\n", ok ? "ok" : "FAILED", name.c_str());
    if (!ok) failures += 1;
}

template <typename T>
void check_products(const char* type) {
    std::mt19937 gen(7);
    std::uniform_int_distribution<int> small(-4, 4);
    float a[256], b[128], c[128], d[128], want[128], rows_swapped[128];
    for (float& x : a) x = static_cast<float>(small(gen));
    for (float& x : b) x = static_cast<float>(small(gen));
    for (float& x : c) x = static_cast<float>(small(gen));
    for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 8; ++j) {
            float exact = c[i * 8 + j], swapped = c[i * 8 + j];
            for (int k = 0; k < 16; ++k) {
                exact += a[i * 16 + k] * b[k * 8 + j];
                swapped += a[(i ^ 8) * 16 + k] * b[k * 8 + j];
            }
            want[i * 8 + j] = exact;
            rows_swapped[i * 8 + j] = swapped;
        }
    }
    const auto run = [&](Load load) {
        std::fill(std::begin(d), std::end(d), NAN);
        const Case one{a, b, c, d, load};
        if (emulate_launch(product_kernel<T>, 1, 32, 0, nullptr, one) != cudaSuccess) std::abort();
        return std::memcmp(d, want, sizeof(d)) == 0;
    };
    const std::string prefix = std::string(type) + " ";
    check(run(Load::kLdmatrix), prefix + "ldmatrix.x4 + ldmatrix.x2 + mma = A·B + C");
    check(run(Load::kLdmatrixTrans), prefix + "ldmatrix.x4.trans + ldmatrix.x2.trans + mma = A·B + C");
    check(run(Load::kSingleMatrices), prefix + "ldmatrix.x1 + ldmatrix.x1.trans + mma = A·B + C");
    check(run(Load::kFromFormulas), prefix + "fragments from the PTX formulas + mma = A·B + C");
    check(!run(Load::kRowHalvesSwapped) && std::memcmp(d, rows_swapped, sizeof(d)) == 0,
          prefix + "swapped row halves give the row-swapped product");
    check(!run(Load::kMatricesInColumnOrder), prefix + "8x8 blocks in column order give a wrong product");
}

}  // namespace
}  // namespace muse

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], "misaligned") == 0) {
        muse::emulate_launch(muse::misaligned_kernel, 1, 32, 0, nullptr, 0);
        return 0;  // not reached: the emulated ldmatrix aborts
    }
    muse::check_products<__half>("f16");
    muse::check_products<__nv_bfloat16>("bf16");

    alignas(16) unsigned char source[32], result[32];
    for (int i = 0; i < 32; ++i) source[i] = static_cast<unsigned char>(i + 1);
    muse::emulate_launch(muse::copy_kernel, 1, 32, 0, nullptr, muse::CopyCase{source, result});
    bool copied = std::memcmp(result, source, 16) == 0;
    for (int i = 16; i < 32; ++i) copied = copied && result[i] == 0;
    muse::check(copied, "cp.async copies 16 bytes, zero-fills without a source");
    return muse::failures == 0 ? 0 : 1;
}
