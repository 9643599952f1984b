"""bf16 under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors): two upstream defects,
corrected when the interpreter is active so that bf16 kernels give the numbers a GPU gives.

1. The interpreter's ``tl.dot`` (triton 3.6 to at least 3.9) feeds bf16 operands, which it stores as
   raw uint16 bit patterns, straight to ``np.matmul``: it multiplies the integers, not the numbers
   (errors ~1e9, inf maps). The fix decodes bf16 operands to fp32 first, as a GPU's bf16 MMA does
   (exact products, fp32 accumulation).
2. It casts fp32 → bf16 by truncating the mantissa; GPUs round to nearest even. The fix rounds the
   way the hardware does, through torch's cast.

These patch triton's interpreter classes, not our kernels, and only in a process where the
interpreter is active; compiled GPU runs never see them. If triton's internals change so that the
patch cannot be applied, bf16 kernels under the interpreter are refused with a clear error instead
(:func:`bf16_supported`), never run into garbage.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("muse_kernels")

_MARK = "_muse_bf16_fixed"  # also set by the test harness's copy of this fix: never patch twice
_state = {"applied": None, "reason": ""}


def _patch_dot(interpreter, tl, np) -> None:
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, _MARK, False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def decoded(x):
            if x.dtype.scalar == tl.bfloat16:
                data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return x

        return original(self, decoded(a), decoded(b), d, input_precision, max_num_imprecise_acc)

    setattr(create_dot, _MARK, True)
    builder.create_dot = create_dot


def _patch_rounding(interpreter, tl, np) -> None:
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, _MARK, False):
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

    setattr(cast_impl, _MARK, True)
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp


def apply_interpreter_bf16_fixes() -> bool:
    """Patch the interpreter (once per process, one log line); True when bf16 kernels can run."""
    if _state["applied"] is not None:
        return _state["applied"]
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        # Everything the patches touch, looked up now: if triton renamed any of it, refuse bf16 below.
        for owner, name in ((builder, "create_dot"), (builder, "cast_impl"), (builder, "create_fp_to_fp"),
                            (interpreter, "_convert_float"), (interpreter, "TensorHandle"), (tl, "bfloat16")):
            getattr(owner, name)
        already = all(getattr(getattr(builder, name), _MARK, False) for name in ("create_dot", "cast_impl"))
        _patch_dot(interpreter, tl, np)
        _patch_rounding(interpreter, tl, np)
    except (ImportError, AttributeError) as err:
        _state.update(applied=False, reason=f"{type(err).__name__}: {err}")
        log.warning("Triton interpreter: cannot correct its bf16 arithmetic in this triton version (%s); bf16 "
                    "kernels are refused under the interpreter", _state["reason"])
        return False
    _state["applied"] = True
    if not already:
        log.info("Triton interpreter active: corrected its bf16 dot (raw bit patterns were multiplied) and its "
                 "fp32→bf16 rounding (truncation instead of round-to-nearest-even), as on a GPU")
    return True


def bf16_supported() -> tuple[bool, str]:
    """Whether bf16 kernels give correct numbers under the interpreter, and why not."""
    ok = apply_interpreter_bf16_fixes()
    return ok, _state["reason"]
