"""What the test suite and the self-check (``python -m ultron_kernels``) share: the parity
rule against the float64 oracle, and GPU numerics for Triton's interpreter.

Tolerances follow the GPU's arithmetic, not the interpreter's exact fp32: 16-bit operands
multiplied exactly and accumulated in fp32, results rounded to nearest-even once per stored
value (bf16 keeps 8 significant bits, fp16 11); float32 dots are IEEE unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, 11 bits, which the fp32 row
below does not cover: the tests and the self-check leave it off).
"""

from __future__ import annotations

import dataclasses

import torch

# (relative ||a-b||/||b||, max abs error as a fraction of max(max |b|, 1)), written once.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 6e-2),
}


@dataclasses.dataclass(frozen=True)
class Parity:
    relative: float
    max_abs: float
    rel_tol: float
    abs_tol: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.relative <= self.rel_tol and self.max_abs <= self.abs_tol

    def __str__(self) -> str:
        if not self.finite:
            return "non-finite values (unwritten or NaN)"
        return (f"relative error {self.relative:.3g} (tol {self.rel_tol:g}), max abs error "
                f"{self.max_abs:.3g} (tol {self.abs_tol:.3g})")


def parity(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Parity:
    """``actual`` (any dtype) against the float64 ``expected``, with ``dtype``'s tolerances."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    rel_tol, abs_frac = TOLERANCES[dtype]
    denom = expected.norm().item()
    # A zero reference leaves the relative error undefined: the max-abs bound decides.
    relative = (actual - expected).norm().item() / denom if denom > 0 else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    max_abs = (actual - expected).abs().max().item() if expected.numel() else 0.0
    # Inputs are O(1); a result that is exactly zero in float64 (a one-token window's dk and
    # dbias: dO.V - dO.O cancels) still carries the rounding of its O(1)..O(D) intermediates,
    # so the max-abs bound never drops below the dtype's fraction of 1.
    return Parity(relative, max_abs, rel_tol, abs_frac * max(scale, 1.0),
                  bool(torch.isfinite(actual).all()))


def use_gpu_numerics_in_triton_interpreter() -> None:
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
