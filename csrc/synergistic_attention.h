// Synergistic attention, CUDA C++ backend: the launchers' C++ API.
//
// Free of torch headers on purpose: every .cu file compiles with plain `nvcc -c` (CI checks sm_80
// and sm_90 on machines without a GPU or a CUDA build of torch); bindings.cpp adapts torch tensors.
//
// Conventions shared with the Triton kernels: q, k, v, out are (B, H, N, D) with any strides but a
// contiguous last dimension (strides below are in elements); the row log-sum-exp `lse` is (B, H, N)
// fp32, contiguous, in base 2 of the scaled logits (lse2 = log2 Σ_j exp2(s_ij · log2 e)); maps are
// (B, H, N, N) per head or (B, N, N) head-mean, fp32 or bf16.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace muse {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RowStrides {  // (batch, head, row) strides of a (B, H, N, D) tensor
    int64_t b = 0, h = 0, n = 0;
};

struct MapStrides {  // (batch, head, row, column) strides of a map; h = 0 for head-mean maps
    int64_t b = 0, h = 0, m = 0, n = 0;
};

struct Shape {
    int batch = 0, heads = 0, seq = 0, head_dim = 0;
};

struct ForwardParams {
    const void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;  // null: only the LSE (and the KL) are wanted, no output
    void* out = nullptr;
    float* lse = nullptr;
    // With a teacher map ((B, N, N) shared by the heads: head stride 0, or (B, H, N, N)), row_kl
    // (B, H, N) receives each row's KL(t ‖ A) in nats, from three running sums: no map is written.
    const void* teacher = nullptr;
    float* row_kl = nullptr;
    RowStrides q_strides, k_strides, v_strides, out_strides;
    MapStrides teacher_strides;
    Shape shape;
    float qk_scale_log2 = 0.f;  // scale · log2(e)
    DType dtype = DType::kFloat32;
    DType teacher_dtype = DType::kFloat32;
};

struct MapsParams {
    const void* q = nullptr;
    const void* k = nullptr;
    const float* lse = nullptr;
    void* attn = nullptr;
    RowStrides q_strides, k_strides;
    MapStrides attn_strides;
    Shape shape;
    float qk_scale_log2 = 0.f;
    DType dtype = DType::kFloat32;
    DType attn_dtype = DType::kFloat32;
    bool head_mean = false;
};

struct BackwardParams {
    const void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;  // may be null when neither out_to_qk nor compute_dv
    const void* out = nullptr;
    const void* grad_out = nullptr;   // read when out_to_qk or compute_dv
    const void* grad_attn = nullptr;  // read when has_grad_attn
    // A per-head KL term (has_teacher): dS += kl_grad · kl_scale · (rowsum(t)·P − t), with kl_grad a
    // device scalar (no host sync) and teacher_rowsum (B, H or 1, N) fp32.
    const void* teacher = nullptr;
    const float* teacher_rowsum = nullptr;
    const float* kl_grad = nullptr;
    const float* lse = nullptr;
    float* delta = nullptr;  // (B, H, N) fp32 scratch: Δ = rowsum(P ⊙ dP)
    void* dq = nullptr;
    void* dk = nullptr;
    void* dv = nullptr;
    RowStrides q_strides, k_strides, v_strides, out_strides, grad_out_strides;
    RowStrides dq_strides, dk_strides, dv_strides;
    MapStrides grad_attn_strides, teacher_strides;
    RowStrides teacher_rowsum_strides;
    Shape shape;
    float qk_scale_log2 = 0.f;
    float sm_scale = 0.f;
    float grad_attn_weight = 1.f;  // 1/H for head-mean map gradients
    float kl_scale = 0.f;
    DType dtype = DType::kFloat32;
    DType grad_attn_dtype = DType::kFloat32;
    DType teacher_dtype = DType::kFloat32;
    bool out_to_qk = false;      // unshielded: dO·Vᵀ reaches the logits
    bool has_grad_attn = false;  // the maps received a gradient
    bool has_teacher = false;    // a per-head KL term
    bool compute_dqk = false;
    bool compute_dv = false;
};

bool supported_head_dim(int head_dim);

// Each returns the launch error, if any (kernels run asynchronously on `stream`).
cudaError_t synergistic_attention_forward(const ForwardParams& params, cudaStream_t stream);
cudaError_t synergistic_attention_maps(const MapsParams& params, cudaStream_t stream);
cudaError_t synergistic_attention_backward(const BackwardParams& params, cudaStream_t stream);

}  // namespace muse
