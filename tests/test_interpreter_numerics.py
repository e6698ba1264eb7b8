"""The Triton kernels run unchanged in the interpreter (no interpreter-only code path); the
harness (conftest: ultron_kernels.testing.use_gpu_numerics_in_triton_interpreter) makes the
interpreter's 16-bit dot and fp32->bf16 rounding match the GPU's."""

import inspect

import pytest
import torch

from ultron_kernels.backends import triton_interpreter_on

pytestmark = pytest.mark.skipif(not triton_interpreter_on(), reason="Triton's interpreter is not on")


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_and_round(a_ptr, b_ptr, c_ptr, r_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        c = tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)
        tl.store(r_ptr + rm[:, None] * N + rn[None, :], c.to(tl.bfloat16))

    return dot_and_round


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_dot_and_bf16_rounding_match_the_gpu(dtype):
    kernel = _kernels()
    a, b = torch.randn(32, 16).to(dtype), torch.randn(16, 32).to(dtype)
    c = torch.empty(32, 32)
    rounded = torch.empty(32, 32, dtype=torch.bfloat16)
    kernel[(1,)](a, b, c, rounded, M=32, N=32, K=16)
    exact = a.double() @ b.double()  # 16-bit products are exact; fp32 accumulation
    assert (c.double() - exact).abs().max() < 1e-5
    assert torch.equal(rounded, c.to(torch.bfloat16))  # round to nearest even, as on the GPU


def test_kernels_have_no_interpreter_path():
    from ultron_kernels.triton import grouped_depthwise_conv, window_attention

    for module in (grouped_depthwise_conv, window_attention):
        source = inspect.getsource(module)
        assert "DOT_FP32" not in source and "TRITON_INTERPRET" not in source, module.__name__
