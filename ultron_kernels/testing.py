"""What the test suite and the self-check (``python -m ultron_kernels``) share: the parity
rule against the float64 oracle. (The GPU numerics of Triton's interpreter are the library's
own: ultron_kernels/triton/interpreter.py.)

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
    # dbias: dO.V - delta cancels) still carries the rounding of its O(1)..O(D) intermediates,
    # so the max-abs bound never drops below the dtype's fraction of 1.
    return Parity(relative, max_abs, rel_tol, abs_frac * max(scale, 1.0),
                  bool(torch.isfinite(actual).all()))
