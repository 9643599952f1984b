// Torch bindings of the CUDA backend: input validation, allocation, and the launchers' params.
//
// The only file that includes torch headers (see synergistic_attention.h). Exposed to Python as
// `fwd` and `bwd`; muse_kernels/ops/synergistic_attention_cuda.py wraps them in torch.library ops.
#include <optional>
#include <string>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "synergistic_attention.h"

namespace {

muse::DType to_dtype(const at::Tensor& x, const char* name) {
    switch (x.scalar_type()) {
        case at::kFloat:
            return muse::DType::kFloat32;
        case at::kHalf:
            return muse::DType::kFloat16;
        case at::kBFloat16:
            return muse::DType::kBFloat16;
        default:
            TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
    }
    return muse::DType::kFloat32;
}

muse::DType to_map_dtype(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
                " must be float32 or bfloat16, got ", x.scalar_type());
    return x.scalar_type() == at::kFloat ? muse::DType::kFloat32 : muse::DType::kBFloat16;
}

muse::RowStrides row_strides(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

void check_qkv_like(const at::Tensor& x, const at::Tensor& q, const char* name) {
    TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(x.dim() == 4, name, " must be 4-D (batch, heads, seq_len, head_dim), got ", x.sizes());
    TORCH_CHECK(x.sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.device() == q.device(), name, " must be on q's device ", q.device(), ", got ", x.device());
    TORCH_CHECK(x.stride(3) == 1, name, " must have a contiguous last dimension (stride 1), got stride ",
                x.stride(3));
}

muse::Shape checked_shape(const at::Tensor& q) {
    check_qkv_like(q, q, "q");
    to_dtype(q, "q");
    TORCH_CHECK(muse::supported_head_dim(static_cast<int>(q.size(3))),
                "head_dim (q.shape[-1]) must be 64 or 128 for backend='cuda', got ", q.size(3));
    TORCH_CHECK(q.size(0) >= 1 && q.size(1) >= 1 && q.size(2) >= 1, "q must have batch, heads and seq_len >= 1, got ",
                q.sizes());
    TORCH_CHECK(q.size(2) <= INT32_MAX && q.size(0) * q.size(1) <= INT32_MAX, "q is too large: ", q.sizes());
    return {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
            static_cast<int>(q.size(3))};
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "muse_kernels CUDA backend: ", what, " failed: ", cudaGetErrorString(err));
}

constexpr double kLog2e = 1.4426950408889634;

// A teacher map: (B, N, N) shared by the heads (head stride 0) or (B, H, N, N), fp32 or bf16.
muse::MapStrides checked_teacher(const at::Tensor& teacher, const at::Tensor& q, const muse::Shape& shape) {
    TORCH_CHECK(teacher.device() == q.device(), "teacher must be on q's device ", q.device());
    const bool shared = teacher.dim() == 3;
    const std::vector<int64_t> expected = shared ? std::vector<int64_t>{shape.batch, shape.seq, shape.seq}
                                                 : std::vector<int64_t>{shape.batch, shape.heads, shape.seq, shape.seq};
    TORCH_CHECK(teacher.sizes() == at::IntArrayRef(expected), "teacher must have shape (B, N, N) or (B, H, N, N) = ",
                at::IntArrayRef(expected), ", got ", teacher.sizes());
    to_map_dtype(teacher, "teacher");
    return shared ? muse::MapStrides{teacher.stride(0), 0, teacher.stride(1), teacher.stride(2)}
                  : muse::MapStrides{teacher.stride(0), teacher.stride(1), teacher.stride(2), teacher.stride(3)};
}

// (out — empty without v —, attn — empty without maps —, lse2, row_kl — empty without a teacher). out
// is (B, H, N, D) stored as (B, N, H, D), like the Triton backend's, so merging heads is a free view.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& v,
                                double scale, const std::string& map_mode, bool attn_bf16,
                                const std::optional<at::Tensor>& teacher) {
    const muse::Shape shape = checked_shape(q);
    check_qkv_like(k, q, "k");
    if (v.has_value()) check_qkv_like(*v, q, "v");
    TORCH_CHECK(map_mode == "none" || map_mode == "per_head" || map_mode == "head_mean",
                "map_mode must be 'none', 'per_head' or 'head_mean', got '", map_mode, "'");
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

    at::Tensor out = v.has_value()
                         ? at::empty({shape.batch, shape.seq, shape.heads, shape.head_dim}, q.options()).transpose(1, 2)
                         : at::empty({0}, q.options());
    at::Tensor lse = at::empty({shape.batch, shape.heads, shape.seq}, q.options().dtype(at::kFloat));
    at::Tensor row_kl = teacher.has_value() ? at::empty_like(lse) : at::empty({0}, lse.options());
    muse::ForwardParams fp;
    fp.q = q.data_ptr();
    fp.k = k.data_ptr();
    fp.v = v.has_value() ? v->data_ptr() : nullptr;
    fp.out = v.has_value() ? out.data_ptr() : nullptr;
    fp.lse = lse.data_ptr<float>();
    fp.q_strides = row_strides(q);
    fp.k_strides = row_strides(k);
    if (v.has_value()) {
        fp.v_strides = row_strides(*v);
        fp.out_strides = row_strides(out);
    }
    if (teacher.has_value()) {
        fp.teacher = teacher->data_ptr();
        fp.row_kl = row_kl.data_ptr<float>();
        fp.teacher_strides = checked_teacher(*teacher, q, shape);
        fp.teacher_dtype = to_map_dtype(*teacher, "teacher");
    }
    fp.shape = shape;
    fp.qk_scale_log2 = static_cast<float>(scale * kLog2e);
    fp.dtype = to_dtype(q, "q");
    check_launch(muse::synergistic_attention_forward(fp, stream), "forward");

    const auto attn_options = q.options().dtype(attn_bf16 ? at::kBFloat16 : at::kFloat);
    if (map_mode == "none") return {out, at::empty({0}, attn_options), lse, row_kl};
    const bool head_mean = map_mode == "head_mean";
    at::Tensor attn = head_mean ? at::empty({shape.batch, shape.seq, shape.seq}, attn_options)
                                : at::empty({shape.batch, shape.heads, shape.seq, shape.seq}, attn_options);
    muse::MapsParams mp;
    mp.q = q.data_ptr();
    mp.k = k.data_ptr();
    mp.lse = lse.data_ptr<float>();
    mp.attn = attn.data_ptr();
    mp.q_strides = row_strides(q);
    mp.k_strides = row_strides(k);
    mp.attn_strides = head_mean ? muse::MapStrides{attn.stride(0), 0, attn.stride(1), attn.stride(2)}
                                : muse::MapStrides{attn.stride(0), attn.stride(1), attn.stride(2), attn.stride(3)};
    mp.shape = shape;
    mp.qk_scale_log2 = fp.qk_scale_log2;
    mp.dtype = fp.dtype;
    mp.attn_dtype = attn_bf16 ? muse::DType::kBFloat16 : muse::DType::kFloat32;
    mp.head_mean = head_mean;
    check_launch(muse::synergistic_attention_maps(mp, stream), "maps");
    return {out, attn, lse, row_kl};
}

// (dq, dk, dv). grad_attn: (B, H, N, N) for per-head maps, (B, N, N) for head-mean maps (each head
// then receives 1/H of it). shield: the output gradient reaches V only.
// With a teacher, the per-head KL's logit gradient kl_grad · kl_scale · (rowsum(t)·P − t) is added
// (kl_grad: a one-element fp32 tensor read on the device). Without v, dv is empty.
std::vector<at::Tensor> backward(const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_attn,
                                 const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& v,
                                 const std::optional<at::Tensor>& out, const at::Tensor& lse, double scale,
                                 bool shield, const std::optional<at::Tensor>& teacher,
                                 const std::optional<at::Tensor>& kl_grad, double kl_scale) {
    const muse::Shape shape = checked_shape(q);
    check_qkv_like(k, q, "k");
    TORCH_CHECK(v.has_value() == out.has_value(), "v and out come together");
    if (v.has_value()) {
        check_qkv_like(*v, q, "v");
        check_qkv_like(*out, q, "out");
    }
    TORCH_CHECK(!grad_out.has_value() || v.has_value(), "grad_out needs v and out");
    TORCH_CHECK(teacher.has_value() == kl_grad.has_value(), "teacher and kl_grad come together");
    TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                    lse.sizes() == at::IntArrayRef({shape.batch, shape.heads, shape.seq}),
                "lse must be a contiguous float32 (batch, heads, seq_len) CUDA tensor");
    at::Tensor dout;
    if (grad_out.has_value()) {
        dout = grad_out->stride(3) == 1 ? *grad_out : grad_out->contiguous();
        check_qkv_like(dout, q, "grad_out");
    }
    at::Tensor dattn;
    bool head_mean = false;
    if (grad_attn.has_value()) {
        dattn = *grad_attn;
        head_mean = dattn.dim() == 3;
        const std::vector<int64_t> expected =
            head_mean ? std::vector<int64_t>{shape.batch, shape.seq, shape.seq}
                      : std::vector<int64_t>{shape.batch, shape.heads, shape.seq, shape.seq};
        TORCH_CHECK(dattn.sizes() == at::IntArrayRef(expected), "grad_attn must have shape ", at::IntArrayRef(expected),
                    ", got ", dattn.sizes());
        TORCH_CHECK(dattn.device() == q.device(), "grad_attn must be on q's device");
    }
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

    muse::BackwardParams p;
    p.out_to_qk = dout.defined() && !shield;
    p.has_grad_attn = dattn.defined();
    p.has_teacher = teacher.has_value();
    p.compute_dqk = p.out_to_qk || p.has_grad_attn || p.has_teacher;
    p.compute_dv = dout.defined();
    // Shielded with no gradient on the maps: Q and K receive exactly zero.
    at::Tensor dq = p.compute_dqk ? at::empty_like(q) : at::zeros_like(q);
    at::Tensor dk = p.compute_dqk ? at::empty_like(k) : at::zeros_like(k);
    at::Tensor dv = !v.has_value()  ? at::empty({0}, q.options())
                    : p.compute_dv ? at::empty_like(*v)
                                   : at::zeros_like(*v);
    if (!p.compute_dqk && !p.compute_dv) return {dq, dk, dv};
    at::Tensor delta = at::empty({shape.batch, shape.heads, shape.seq}, q.options().dtype(at::kFloat));
    at::Tensor teacher_rowsum, kl_grad32;
    if (p.has_teacher) {
        p.teacher = teacher->data_ptr();
        p.teacher_strides = checked_teacher(*teacher, q, shape);
        p.teacher_dtype = to_map_dtype(*teacher, "teacher");
        teacher_rowsum = teacher->sum(-1, /*keepdim=*/false, at::kFloat);
        p.teacher_rowsum = teacher_rowsum.data_ptr<float>();
        p.teacher_rowsum_strides = teacher_rowsum.dim() == 2
                                       ? muse::RowStrides{teacher_rowsum.stride(0), 0, teacher_rowsum.stride(1)}
                                       : row_strides(teacher_rowsum);
        kl_grad32 = kl_grad->to(q.device(), at::kFloat).reshape({1}).contiguous();
        p.kl_grad = kl_grad32.data_ptr<float>();
        p.kl_scale = static_cast<float>(kl_scale);
    }

    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.has_value() ? v->data_ptr() : nullptr;
    p.out = out.has_value() ? out->data_ptr() : nullptr;
    p.grad_out = dout.defined() ? dout.data_ptr() : nullptr;
    p.grad_attn = dattn.defined() ? dattn.data_ptr() : nullptr;
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.q_strides = row_strides(q);
    p.k_strides = row_strides(k);
    if (v.has_value()) {
        p.v_strides = row_strides(*v);
        p.out_strides = row_strides(*out);
        p.dv_strides = row_strides(dv);
    }
    if (dout.defined()) p.grad_out_strides = row_strides(dout);
    p.dq_strides = row_strides(dq);
    p.dk_strides = row_strides(dk);
    if (dattn.defined()) {
        p.grad_attn_dtype = to_map_dtype(dattn, "grad_attn");
        p.grad_attn_strides =
            head_mean ? muse::MapStrides{dattn.stride(0), 0, dattn.stride(1), dattn.stride(2)}
                      : muse::MapStrides{dattn.stride(0), dattn.stride(1), dattn.stride(2), dattn.stride(3)};
        p.grad_attn_weight = head_mean ? 1.f / static_cast<float>(shape.heads) : 1.f;
    }
    p.shape = shape;
    p.qk_scale_log2 = static_cast<float>(scale * kLog2e);
    p.sm_scale = static_cast<float>(scale);
    p.dtype = to_dtype(q, "q");
    check_launch(muse::synergistic_attention_backward(p, stream), "backward");
    return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "muse_kernels CUDA C++ backend: synergistic attention forward (with maps) and backward";
    m.def("fwd", &forward, "forward: (out or empty, attn or empty, lse2, row_kl or empty)", pybind11::arg("q"),
          pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("scale"), pybind11::arg("map_mode"),
          pybind11::arg("attn_bf16"), pybind11::arg("teacher"));
    m.def("bwd", &backward, "backward: (dq, dk, dv or empty)", pybind11::arg("grad_out"), pybind11::arg("grad_attn"),
          pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
          pybind11::arg("scale"), pybind11::arg("shield"), pybind11::arg("teacher"), pybind11::arg("kl_grad"),
          pybind11::arg("kl_scale"));
}
