"""Test setup: Triton interpreter on GPU-less machines, its bf16 dot fix, a device fixture."""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Must be set before triton.jit decorates the kernels, i.e. before muse_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter's ``tl.dot`` (triton 3.6 to at least 3.9) feeds bf16 tensors, which it stores as
    raw uint16 bit patterns, straight to ``np.matmul``: it multiplies the integers, not the numbers.
    Decode bf16 operands to fp32 first, as a GPU's bf16 MMA would (exact products, fp32 accumulate).
    This patches the test harness only; the kernels are unchanged."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_muse_bf16_fixed", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def decoded(x):
            if x.dtype.scalar == tl.bfloat16:
                data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return x

        return original(self, decoded(a), decoded(b), d, input_precision, max_num_imprecise_acc)

    create_dot._muse_bf16_fixed = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_rounding() -> None:
    """The interpreter casts fp32 → bf16 by truncating the mantissa (round toward zero); GPUs round to
    nearest even. Truncation doubles and biases every rounding error, so a correct kernel fails an
    accuracy bound it meets on hardware. Round the way the hardware does, through torch's cast."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_muse_bf16_fixed", False):
        return
    original_cast, original_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src):
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def is_f32_to_bf16(src, dst_type):
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    def cast_impl(self, src, dst_type):
        return to_bf16(src) if is_f32_to_bf16(src, dst_type) else original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_f32_to_bf16(src, dst_type):
            return to_bf16(src)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    cast_impl._muse_bf16_fixed = True
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16_dot()
    _patch_interpreter_bf16_rounding()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Kernel tests run on CUDA when present, else on CPU tensors through the Triton interpreter."""
    return torch.device("cuda" if HAS_GPU else "cpu")
