"""Shared test helpers: backend/device cases, the parity check against a float64 oracle,
output poisoning."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from ultron_kernels.backends import available_backends
from ultron_kernels.testing import parity


def assert_parity(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """``actual`` (any dtype) against the float64 ``expected``, with ``dtype``'s tolerances
    (ultron_kernels.testing.TOLERANCES)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    result = parity(actual, expected, dtype)
    assert result.ok, f"{name} ({dtype}): {result}"


def assert_parity_or_as_conditioned(name: str, actual: torch.Tensor, expected: torch.Tensor,
                                    dtype: torch.dtype, eager):
    """``actual`` against the float64 ``expected`` with ``dtype``'s tolerances; where a
    quantity's condition puts even plain PyTorch in ``dtype`` outside them (a gradient that
    sums many cancelling terms, e.g. an attention scale's), within twice plain PyTorch's own
    error instead. ``eager()`` computes that same quantity in plain PyTorch (the untouched
    model, or the reference on the same inputs); it runs only when the tolerances fail."""
    result = parity(actual, expected, dtype)
    if result.ok:
        return
    own = parity(eager(), expected, dtype)
    assert result.finite and result.relative <= 2 * own.relative, (
        f"{name} ({dtype}): {result}; plain PyTorch's relative error: {own.relative:.3g}")


def _gradients(model, x, grad, layout):
    x = x.detach().to(memory_format=layout).requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_swapped_model_matches(swapped, original, x, grad, dtype: torch.dtype,
                                 layout=torch.contiguous_format) -> None:
    """A swapped model in ``dtype`` (and memory ``layout``) against its untouched ``original``
    in float64 on ``x``: the output, the input gradient and every parameter gradient, with
    ``dtype``'s tolerances; a gradient (input or parameter) that the untouched model in ``dtype``
    misses too (one that sums many layers' rounding) is held to twice that model's own error."""
    untouched = copy.deepcopy(original)
    want = _gradients(original.double(), x.double(), grad.double(), torch.contiguous_format)
    got = _gradients(swapped.to(dtype, memory_format=layout), x.to(dtype), grad.to(dtype), layout)
    assert_parity("output", got[0], want[0], dtype)
    assert got[2].keys() == want[2].keys()
    own = []

    def untouched_in_dtype(name):
        if not own:
            out, x_grad, grads = _gradients(untouched.to(dtype, memory_format=layout), x.to(dtype), grad.to(dtype),
                                            layout)
            own.append(dict(grads, **{"input grad": x_grad}))
        return own[0][name]

    # A deep model's input gradient sums every layer's rounding too (MixNet-M's, in fp32
    # channels_last: 3.1e-5 relative in plain PyTorch): held to the same rule.
    assert_parity_or_as_conditioned("input grad", got[1], want[1], dtype, lambda: untouched_in_dtype("input grad"))
    for name in want[2]:
        assert_parity_or_as_conditioned(f"grad {name}", got[2][name], want[2][name], dtype,
                                        lambda: untouched_in_dtype(name))


def randomise_constants(model):
    """Every constant-initialised parameter and batch-norm statistic moved off its constant:
    libraries zero-init or one-init some (Swin V2's post-norms, ConvNeXt's 1e-6 layer scale,
    batch-norm weights, biases and running statistics), which would hide a wrong operator.
    Randomly initialised weights keep their scale (noise on them would make deep models
    ill-conditioned). Returns model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def swap_convnet_and_compare(original, backend: str, size: int, **swap_options):
    """swap_in on a copy of a convnet (``original``: eval mode, constants randomised) on
    ``backend``: state_dict keys and shapes unchanged, and the swapped copy against the
    original (float64 on the reference backend; float32 channels_last on the fused ones, as
    convnets run on GPUs: NCHW is the op-level tests'). Returns the report."""
    import ultron_kernels as uk

    swapped = copy.deepcopy(original)
    keys = {k: v.shape for k, v in swapped.state_dict().items()}
    report = uk.swap_in(swapped, backend, **swap_options)
    assert {k: v.shape for k, v in swapped.state_dict().items()} == keys
    dtype = torch.float64 if backend == "reference" else torch.float32
    layout = torch.contiguous_format if backend == "reference" else torch.channels_last
    torch.manual_seed(1)
    assert_swapped_model_matches(swapped, original, torch.randn(1, 3, size, size), torch.randn(1, 10), dtype, layout)
    return report


def assert_checkpoints_load_both_ways(original, swapped, other, size: int) -> None:
    """``swapped`` (a swapped copy of ``original``) loads a checkpoint of the library's model
    (``other``), and ``original`` loads one saved after the swap: both then compute
    ``other``'s output (the swapped one up to fp32 summation order)."""
    swapped.load_state_dict(other.state_dict())
    original.load_state_dict(swapped.state_dict())
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), other(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(original(x), other(x))


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The compile gates (tools/compile_*.py): test module -> the tool's arguments. Each runs in its
# own process, started when its module is collected, so that it compiles while the other tests
# run; its test module then waits for the result. Under pytest-xdist the first worker starts
# them and any worker may wait: their files are per test run, not per process.
STATIC_GATES = {
    "test_triton_compile.py": ["compile_triton.py", "--jobs", "2"],
    "test_cuda_compile.py": ["compile_cuda.py", "--jobs", "1",
                             *(f"--arch={arch}" for arch in (90, 89, 86, 80, 75))],
}
_gates: dict = {}


def starts_static_gates() -> bool:
    """Whether this process starts the gates: without pytest-xdist it does; with it, worker gw0."""
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0"


def _gate_files(module: str) -> tuple[str, str, str]:
    """(JSON rows, log, exit status) of ``module``'s gate in this test run."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")
    folder = os.path.join(tempfile.gettempdir(), f"ultron-static-gates-{run}")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, module.replace(".py", ""))
    return stem + ".json", stem + ".log", stem + ".status"


def start_static_gate(module: str) -> None:
    if module in _gates or (module == "test_cuda_compile.py" and shutil.which("nvcc") is None):
        return
    tool, *args = STATIC_GATES[module]
    out, log, status = _gate_files(module)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    command = shlex.join([sys.executable, os.path.join(ROOT, "tools", tool), *args, "--json", out])
    # The exit status appears (renamed into place) only once the tool has ended: a waiting
    # worker polls for it.
    script = (f"{command} > {shlex.quote(log)} 2>&1; echo $? > {shlex.quote(status + '.part')}; "
              f"mv {shlex.quote(status + '.part')} {shlex.quote(status)}")
    _gates[module] = subprocess.Popen(["sh", "-c", script], env=env)


def static_gate_rows(module: str, timeout: float = 1800) -> list[dict]:
    """The JSON rows of ``module``'s gate (started now if collection did not)."""
    if starts_static_gates():
        start_static_gate(module)
    out, log, status = _gate_files(module)
    deadline = time.monotonic() + timeout
    while not os.path.exists(status):
        if time.monotonic() > deadline:
            pytest.fail(f"tools/{STATIC_GATES[module][0]} did not finish within {timeout} s")
        time.sleep(1)
    if not os.path.exists(out):
        with open(status) as f, open(log) as g:
            pytest.fail(f"tools/{STATIC_GATES[module][0]} produced nothing (exit {f.read().strip()}):\n"
                        + g.read()[-4000:])
    with open(out) as f:
        return json.load(f)


UPDATE_HINT = "ULTRON_KERNELS_UPDATE_SNAPSHOTS=1 rewrites it after a deliberate change"


def check_snapshot(path: str, current: dict, non_increasing: tuple, must_keep: tuple = (),
                   non_decreasing: tuple = (), unchanged: tuple = ()) -> None:
    """``current`` ({instance: {number: value}}) against the committed snapshot at ``path``:
    the same instances, none of ``non_increasing`` grown, none of ``non_decreasing`` shrunk,
    none of ``must_keep`` dropped to zero, ``unchanged`` (e.g. a chosen configuration) equal. ULTRON_KERNELS_UPDATE_SNAPSHOTS=1 (or a missing
    file) writes ``current`` instead."""
    if os.environ.get("ULTRON_KERNELS_UPDATE_SNAPSHOTS") == "1" or not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(path) as f:
        snapshot = json.load(f)
    assert sorted(current) == sorted(snapshot), (
        f"instances changed: new {sorted(set(current) - set(snapshot))}, gone "
        f"{sorted(set(snapshot) - set(current))} ({UPDATE_HINT})")
    worse = {}
    for name, now in current.items():
        was = snapshot[name]
        changed = {key: (was[key], now[key]) for key in non_increasing if now[key] > was[key]}
        changed.update({key: (was[key], now[key]) for key in non_decreasing if now[key] < was[key]})
        changed.update({key: (was[key], now[key]) for key in must_keep if was[key] and not now[key]})
        changed.update({key: (was[key], now[key]) for key in unchanged if was[key] != now[key]})
        if changed:
            worse[name] = changed
    assert not worse, f"regressions against {os.path.relpath(path, ROOT)} ({UPDATE_HINT}): {worse}"
