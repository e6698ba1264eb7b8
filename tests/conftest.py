"""Test set-up: without a GPU, Triton kernels run on CPU tensors through the interpreter,
which must be switched on before triton is first imported."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# The CUDA backend's kernels also run on CPU tensors, through the host simulation
# (ultron_kernels._C_sim): every CPU parity test covers them too.
os.environ.setdefault("ULTRON_KERNELS_CUDA_SIM", "1")
# Fixed kernel configurations for the many shapes of the sweeps; test_autotuned_launches
# switches tuning back on for a few shapes.
os.environ.setdefault("ULTRON_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import ultron_kernels  # noqa: E402,F401

# No interpreter fix here: the library applies its own (ultron_kernels/triton/interpreter.py)
# when its Triton kernels are imported, so every Triton test on the CPU also checks that.

# Random shape sweeps: a handful of cases per property on the CPU (the interpreter is slow),
# more on a GPU (each new window or kernel size compiles a kernel: ~1 s); ULTRON_KERNELS_SWEEP
# overrides.
settings.register_profile("ultron", deadline=None, print_blob=True, derandomize=False,
                          max_examples=int(os.environ.get(
                              "ULTRON_KERNELS_SWEEP", 25 if torch.cuda.is_available() else 6)))
settings.load_profile("ultron")


# Under pytest-xdist (make test: two workers), each worker's torch gets its share of the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    from helpers import STATIC_GATES, start_static_gate, starts_static_gates

    if starts_static_gates():
        for module in sorted({item.path.name for item in items} & set(STATIC_GATES)):
            start_static_gate(module)
    # The gates' own tests wait for their compiles: run them last, the rest meanwhile.
    items.sort(key=lambda item: item.path.name in STATIC_GATES)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seeded_per_test(request):
    """Seeds torch from the test's id: inputs drawn fresh per test, but the same in every run
    whatever ran before, so that a failure reproduces."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
