"""The benchmark cases under pytest-benchmark: `pytest bench --benchmark-only`.

Same cases and inputs as `python -m bench` (quick preset on a GPU, tiny on the CPU), timed
by pytest-benchmark with a CUDA synchronisation after each call.
"""

import pytest
import torch

from bench.cases import ATTN_SHAPES, CONV_SHAPES, attention_cases, conv_cases, cosine_attention_cases, fwd_bwd, rotate

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
PRESET, DTYPE = ("quick", torch.bfloat16) if GPU else ("tiny", torch.float32)


def _params():
    for case in (conv_cases(CONV_SHAPES[PRESET], DTYPE, DEVICE) + attention_cases(ATTN_SHAPES[PRESET], DTYPE, DEVICE)
                 + cosine_attention_cases(ATTN_SHAPES[PRESET], DTYPE, DEVICE)):
        for name, forward in case.variants.items():
            for direction in ("fwd", "fwd+bwd"):
                yield pytest.param(case, forward, direction,
                                   id=f"{case.op}-{case.shape}-{case.layout}-{name}-{direction}")


@pytest.mark.parametrize("case,forward,direction", list(_params()))
def test_benchmark(benchmark, case, forward, direction):
    fn = rotate(case.inputs, forward if direction == "fwd" else fwd_bwd(forward))

    def synced():
        result = fn()
        if GPU:
            torch.cuda.synchronize()
        return result

    if direction == "fwd":
        with torch.no_grad():
            benchmark(synced)
    else:
        benchmark(synced)
