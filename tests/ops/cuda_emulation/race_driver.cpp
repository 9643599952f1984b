// Runs the emulated forward, maps and backward once per (dtype, head dim, map kind, shield) case on
// random data, for ThreadSanitizer: a barrier missing from a kernel is a data race between the host
// threads that stand in for its CUDA threads. Prints one line per launch with its error code.
#include <cstdio>
#include <random>
#include <vector>

#include "emulator.cpp"

namespace {

template <typename T>
void run(int dtype, int batch, int heads, int seq, int dim, bool head_mean, bool shield) {
    std::mt19937 gen(0);
    std::normal_distribution<float> normal;
    const size_t n = size_t(batch) * heads * seq * dim;
    std::vector<T> q(n), k(n), v(n), out(n), dout(n), dq(n), dk(n), dv(n);
    for (size_t i = 0; i < n; ++i) {
        q[i] = muse::from_float<T>(normal(gen));
        k[i] = muse::from_float<T>(normal(gen));
        v[i] = muse::from_float<T>(normal(gen));
        dout[i] = muse::from_float<T>(normal(gen));
    }
    std::vector<float> lse(size_t(batch) * heads * seq), delta(lse.size());
    const size_t map_size = head_mean ? size_t(batch) * seq * seq : size_t(batch) * heads * seq * seq;
    std::vector<float> attn(map_size), dattn(map_size);
    for (float& x : dattn) x = normal(gen);

    const std::vector<int64_t> rows = {int64_t(heads) * seq * dim, int64_t(seq) * dim, dim};
    const std::vector<int64_t> map = head_mean ? std::vector<int64_t>{int64_t(seq) * seq, 0, seq, 1}
                                               : std::vector<int64_t>{int64_t(heads) * seq * seq, int64_t(seq) * seq, seq, 1};
    auto repeat = [&](int times, const std::vector<int64_t>& tail) {
        std::vector<int64_t> all;
        for (int t = 0; t < times; ++t) all.insert(all.end(), rows.begin(), rows.end());
        all.insert(all.end(), tail.begin(), tail.end());
        return all;
    };
    const float scale = 1.f / std::sqrt(float(dim));
    const float scale_log2 = scale * 1.4426950408889634f;
    // A (B, N, N) teacher shared by the heads: rows of 1/N.
    std::vector<float> teacher(size_t(batch) * seq * seq, 1.f / seq), row_kl(lse.size());
    std::vector<float> teacher_rowsum(size_t(batch) * seq, 1.f);
    const std::vector<int64_t> shared = {int64_t(seq) * seq, 0, seq, 1};
    std::printf("forward %d\n", emu_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), teacher.data(),
                                           row_kl.data(), repeat(4, shared).data(), batch, heads, seq, dim,
                                           scale_log2, dtype, 0));
    std::printf("maps %d\n", emu_maps(q.data(), k.data(), lse.data(), attn.data(), repeat(2, map).data(), batch, heads,
                                     seq, dim, scale_log2, dtype, 0, head_mean));
    const float kl_grad = 1.f;
    const void* tensors[12] = {q.data(), k.data(), v.data(), out.data(), dout.data(), dattn.data(), dq.data(),
                               dk.data(), dv.data(), teacher.data(), teacher_rowsum.data(), &kl_grad};
    std::vector<int64_t> strides = repeat(8, map);
    strides.insert(strides.end(), shared.begin(), shared.end());
    const std::vector<int64_t> rowsum = {seq, 0, 1};
    strides.insert(strides.end(), rowsum.begin(), rowsum.end());
    const int flags[5] = {!shield, 1, 1, 1, 1};
    std::printf("backward %d\n", emu_backward(tensors, lse.data(), delta.data(), strides.data(), batch, heads, seq, dim,
                                             scale_log2, scale, head_mean ? 1.f / heads : 1.f, 1.f / seq, dtype, 0,
                                             0, flags));
}

}  // namespace

int main() {
    run<float>(0, 1, 2, 40, 64, false, true);
    run<float>(0, 1, 2, 40, 128, true, false);
    run<__half>(1, 1, 2, 45, 64, true, true);
    run<__half>(1, 1, 2, 45, 128, false, false);
    run<__nv_bfloat16>(2, 1, 2, 70, 64, false, false);
    run<__nv_bfloat16>(2, 1, 2, 70, 128, true, true);
    // Three key and query tiles and three heads: every double buffer is refilled after being read.
    run<__nv_bfloat16>(2, 1, 3, 150, 64, true, false);
    return 0;
}
