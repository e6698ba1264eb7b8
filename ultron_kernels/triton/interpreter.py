"""Triton's interpreter (``TRITON_INTERPRET=1``: the kernels on CPU tensors) made to compute
as the GPU does: 16-bit dots and bf16 rounding, and loop bounds loaded from memory. The package applies it itself when its Triton kernels are first imported
with the interpreter on (``ultron_kernels/triton/__init__.py``): without it, a bf16
``window_attention`` on the CPU is wrong by a relative error of ~1e9, silently.
"""

from __future__ import annotations

import torch


def use_gpu_numerics() -> None:
    """Make Triton's interpreter compute 16-bit dots and fp32->bf16 casts as the GPU does.

    The interpreter stores bf16 as raw uint16 and its ``create_dot`` multiplies those bit
    patterns (triton-lang/triton#11584); its fp32->bf16 cast truncates where the GPU rounds
    to nearest-even. The kernels are left as the GPU runs them; this fixes the interpreter.
    Idempotent; a no-op for the compiled (GPU) path, which never calls the interpreter.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_ultron_gpu_numerics", False):
        return

    def as_float32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(widened, tl.float32)
        if handle.dtype.scalar == tl.float16:
            return interpreter.TensorHandle(handle.data.astype(np.float32), tl.float32)
        return handle

    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # Products of 16-bit values are exact in fp32 and accumulate in fp32, as in mma.
        return original_dot(self, as_float32(a), as_float32(b), d, input_precision,
                            max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16),
                                            tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._ultron_gpu_numerics = True
    _index_scalars_as_the_gpu_does(interpreter)


def _index_scalars_as_the_gpu_does(interpreter) -> None:
    """A loop bound loaded from memory (``range(kh)``, kh from the group table) is a scalar on
    the GPU; in the interpreter it is a one-element array, which Triton before 3.7 (3.6 is the
    GPU machine's) converts with ``int(array)``: NumPy 2 refuses that ("only 0-dimensional
    arrays can be converted"). Later Triton squeezes the array first; so do we, for the
    interpreter's run only (its patch scope restores the class afterwards)."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
