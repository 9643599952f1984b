// The CUDA backend's launchers, compiled for the CPU (see cpu_shim.h), behind a flat C API for ctypes.
// Strides are in elements: three per (B, H, N, D) tensor (batch, head, row), four per map.
#include "synergistic_attention_fwd.cu"
#include "synergistic_attention_bwd.cu"

namespace {

muse::RowStrides rows(const int64_t* s) { return {s[0], s[1], s[2]}; }
muse::MapStrides maps(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
muse::Shape shape(int batch, int heads, int seq, int head_dim) { return {batch, heads, seq, head_dim}; }

}  // namespace

extern "C" {

// strides: q, k, v, out (3 each), teacher (4).
int emu_forward(const void* q, const void* k, const void* v, void* out, float* lse, const void* teacher, float* row_kl,
                const int64_t* strides, int batch, int heads, int seq, int head_dim, float qk_scale_log2, int dtype,
                int teacher_dtype) {
    muse::ForwardParams p;
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.lse = lse;
    p.teacher = teacher;
    p.row_kl = row_kl;
    p.q_strides = rows(strides);
    p.k_strides = rows(strides + 3);
    p.v_strides = rows(strides + 6);
    p.out_strides = rows(strides + 9);
    p.teacher_strides = maps(strides + 12);
    p.teacher_dtype = static_cast<muse::DType>(teacher_dtype);
    p.shape = shape(batch, heads, seq, head_dim);
    p.qk_scale_log2 = qk_scale_log2;
    p.dtype = static_cast<muse::DType>(dtype);
    return static_cast<int>(muse::synergistic_attention_forward(p, nullptr));
}

int emu_maps(const void* q, const void* k, const float* lse, void* attn, const int64_t* strides, int batch, int heads,
             int seq, int head_dim, float qk_scale_log2, int dtype, int attn_dtype, int head_mean) {
    muse::MapsParams p;
    p.q = q;
    p.k = k;
    p.lse = lse;
    p.attn = attn;
    p.q_strides = rows(strides);
    p.k_strides = rows(strides + 3);
    p.attn_strides = maps(strides + 6);
    p.shape = shape(batch, heads, seq, head_dim);
    p.qk_scale_log2 = qk_scale_log2;
    p.dtype = static_cast<muse::DType>(dtype);
    p.attn_dtype = static_cast<muse::DType>(attn_dtype);
    p.head_mean = head_mean != 0;
    return static_cast<int>(muse::synergistic_attention_maps(p, nullptr));
}

// tensors: q, k, v, out, grad_out, grad_attn, dq, dk, dv, teacher, teacher_rowsum, kl_grad; strides: q, k,
// v, out, grad_out, dq, dk, dv (3 each), grad_attn (4), teacher (4), teacher_rowsum (3); flags:
// out_to_qk, has_grad_attn, compute_dqk, compute_dv, has_teacher.
int emu_backward(const void* const* tensors, const float* lse, float* delta, const int64_t* strides, int batch,
                 int heads, int seq, int head_dim, float qk_scale_log2, float sm_scale, float grad_attn_weight,
                 float kl_scale, int dtype, int grad_attn_dtype, int teacher_dtype, const int* flags) {
    muse::BackwardParams p;
    p.q = tensors[0];
    p.k = tensors[1];
    p.v = tensors[2];
    p.out = tensors[3];
    p.grad_out = tensors[4];
    p.grad_attn = tensors[5];
    p.dq = const_cast<void*>(tensors[6]);
    p.dk = const_cast<void*>(tensors[7]);
    p.dv = const_cast<void*>(tensors[8]);
    p.lse = lse;
    p.delta = delta;
    p.q_strides = rows(strides);
    p.k_strides = rows(strides + 3);
    p.v_strides = rows(strides + 6);
    p.out_strides = rows(strides + 9);
    p.grad_out_strides = rows(strides + 12);
    p.dq_strides = rows(strides + 15);
    p.dk_strides = rows(strides + 18);
    p.dv_strides = rows(strides + 21);
    p.grad_attn_strides = maps(strides + 24);
    p.teacher = tensors[9];
    p.teacher_rowsum = static_cast<const float*>(tensors[10]);
    p.kl_grad = static_cast<const float*>(tensors[11]);
    p.teacher_strides = maps(strides + 28);
    p.teacher_rowsum_strides = rows(strides + 32);
    p.kl_scale = kl_scale;
    p.teacher_dtype = static_cast<muse::DType>(teacher_dtype);
    p.has_teacher = flags[4] != 0;
    p.shape = shape(batch, heads, seq, head_dim);
    p.qk_scale_log2 = qk_scale_log2;
    p.sm_scale = sm_scale;
    p.grad_attn_weight = grad_attn_weight;
    p.dtype = static_cast<muse::DType>(dtype);
    p.grad_attn_dtype = static_cast<muse::DType>(grad_attn_dtype);
    p.out_to_qk = flags[0] != 0;
    p.has_grad_attn = flags[1] != 0;
    p.compute_dqk = flags[2] != 0;
    p.compute_dv = flags[3] != 0;
    return static_cast<int>(muse::synergistic_attention_backward(p, nullptr));
}

}  // extern "C"
