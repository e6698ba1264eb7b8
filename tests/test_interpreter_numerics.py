"""The Triton kernels run unchanged in the interpreter (no interpreter-only code path); the
library itself (ultron_kernels/triton/interpreter.py, applied when its Triton kernels are
imported) makes the interpreter's 16-bit dot and fp32->bf16 rounding match the GPU's. The
test harness applies nothing: a user's script gets the same numbers as the tests."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

from ultron_kernels.backends import triton_interpreter_on

pytestmark = pytest.mark.skipif(not triton_interpreter_on(), reason="Triton's interpreter is not on")


def _kernels():
    import ultron_kernels.triton  # noqa: F401  (what applies the fix)
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


USER_SCRIPT = """
import torch
import ultron_kernels as uk
from ultron_kernels.testing import parity

torch.manual_seed(0)
q, k, v = (torch.randn(2, 9, 11, 2, 32) for _ in range(3))
table = torch.randn(13 * 13, 2)
expected = uk.window_attention(q.double(), k.double(), v.double(), 7, 3, table.double(), backend="reference")
for dtype in (torch.bfloat16, torch.float16):
    got = uk.window_attention(q.to(dtype), k.to(dtype), v.to(dtype), 7, 3, table, backend="triton")
    result = parity(got, expected, dtype)
    assert result.ok, (dtype, str(result))
print("ok")
"""


def test_a_user_script_gets_gpu_numerics_without_the_harness():
    """A plain script, as a user writes one (TRITON_INTERPRET=1 set before import, no test
    harness): 16-bit Triton attention on CPU tensors matches float64. Without the library's
    fix the bf16 result is off by a relative error of ~1e9."""
    from helpers import ROOT

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", USER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-4000:]
