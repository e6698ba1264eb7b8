"""Shared test helpers: backend/device cases, the parity check against a float64 oracle,
output poisoning."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ultron_kernels.backends import available_backends

# Parity tolerances against the float64 oracle, written once: (relative ||a-b||/||b||,
# max abs error as a fraction of max |b|).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 6e-2),
}
# Kernel dots on float32 inputs use TF32 only where torch.backends.cuda.matmul.allow_tf32 is
# set; the tests leave it off.


def backend_cases(include_reference: bool = True, devices=("cpu", "cuda")):
    """(device, backend) pairs runnable here on ``devices``, GPU pairs marked ``gpu``."""
    cases = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        status = available_backends(device)
        for backend, why in status.items():
            if backend == "reference" and not include_reference:
                continue
            if why == "available":
                marks = [pytest.mark.gpu] if device == "cuda" else []
                cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_parity(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """``actual`` (any dtype) against the float64 ``expected``, with ``dtype``'s tolerances."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten or NaN)"
    rel_tol, abs_frac = TOLERANCES[dtype]
    rel = relative_error(actual, expected)
    if expected.norm() == 0:  # relative error undefined: the max-abs check below decides
        rel = 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    max_abs = (actual - expected).abs().max().item() if expected.numel() else 0.0
    # Test inputs are O(1); a result that is exactly zero in float64 (a one-token window's
    # dk and dbias: dO.V - dO.O cancels) still carries the rounding of its O(1)..O(D)
    # intermediates, so the max-abs bound never drops below the dtype's fraction of 1.
    abs_tol = abs_frac * max(scale, 1.0)
    assert rel <= rel_tol and max_abs <= abs_tol, (
        f"{name} ({dtype}): relative error {rel:.3g} (tol {rel_tol:g}), max abs error "
        f"{max_abs:.3g} (tol {abs_tol:.3g})")


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty allocated inside is filled with NaN (integers: their max), so an
    output element a kernel forgets to write fails the parity check."""
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        det.fill_uninitialized_memory = previous[1]
