"""Backend registry and selection; the compiled extension's registration."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import ultron_kernels as uk
from ultron_kernels import _cuda, backends
from ultron_kernels.backends import select_backend


def test_available_backends_reports_reasons(monkeypatch):
    status = uk.available_backends("cpu")
    assert set(status) == {"reference", "triton", "cuda"}
    assert status["reference"] == "available"
    # CUDA on CPU tensors: only through the host simulation, and the reason says how.
    monkeypatch.setenv(_cuda.SIM_ENV_VAR, "0")
    assert "ULTRON_KERNELS_CUDA_SIM=1" in uk.available_backends("cpu")["cuda"]
    monkeypatch.setenv(_cuda.SIM_ENV_VAR, "1")
    assert uk.available_backends("cpu")["cuda"] == "available" or "_C_sim" in uk.available_backends("cpu")["cuda"]


def test_auto_on_cpu_is_reference():
    assert select_backend("window_attention", "auto", torch.device("cpu"), lambda b: None) == "reference"


def test_env_var_replaces_auto(monkeypatch):
    monkeypatch.setenv("ULTRON_KERNELS_BACKEND", "triton")
    chosen = select_backend("window_attention", "auto", torch.device("cpu"), lambda b: None)
    assert chosen == ("triton" if os.environ.get("TRITON_INTERPRET") == "1" else "reference")
    # an explicit argument wins over the variable
    assert select_backend("window_attention", "reference", torch.device("cpu"), lambda b: None) == "reference"


def test_explicit_unavailable_backend_names_the_reason():
    with pytest.raises(uk.BackendUnavailableError, match="head_dim 12 unsupported"):
        select_backend("window_attention", "triton", torch.device("cpu"),
                       lambda b: "head_dim 12 unsupported" if b != "reference" else None)


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a string"):
        select_backend("window_attention", 3, torch.device("cpu"), lambda b: None)


def test_extension_builds_and_registers_ops():
    """`make test` builds ultron_kernels._C whenever nvcc and a CUDA torch are present
    (ULTRON_KERNELS_REQUIRE_EXTENSION=1): then a broken csrc fails here."""
    if not _cuda.HAS_CUDA_EXTENSION:
        if os.environ.get("ULTRON_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(_cuda.CUDA_EXTENSION_ERROR)
        pytest.skip(_cuda.CUDA_EXTENSION_ERROR)
    _assert_ops_registered("ultron_kernels_cuda")


def _assert_ops_registered(namespace: str):
    ops = getattr(torch.ops, namespace)
    for name in ("grouped_dwconv2d_fwd", "grouped_dwconv2d_bwd", "window_attention_fwd",
                 "window_attention_bwd"):
        assert getattr(ops, name).default._schema.name == f"{namespace}::{name}"


def test_simulation_builds_and_runs_cuda_backend_on_cpu():
    """`make test` builds ultron_kernels._C_sim (the CUDA sources under the host simulation)
    wherever torch and the CUDA headers are: the CUDA backend's parity suite then runs on the
    CPU."""
    why = _cuda.simulation_reason()
    if why is not None and os.environ.get("ULTRON_KERNELS_REQUIRE_EXTENSION") == "1":
        pytest.fail(why)
    if why is not None:
        pytest.skip(why)
    assert uk.available_backends("cpu")["cuda"] == "available"
    _assert_ops_registered("ultron_kernels_cuda_sim")
    sms, major, minor, smem = torch.ops.ultron_kernels_cuda_sim.device_properties()
    assert (major, minor) == (9, 0) and smem == 227 * 1024 and sms >= 1


@pytest.mark.gpu
def test_autotuned_launches(monkeypatch):
    """The autotuned Triton launches (the default outside the test suite) agree with the
    reference on a few shapes, both layouts, forward and backward."""
    if uk.available_backends("cuda")["triton"] != "available":
        pytest.skip(uk.available_backends("cuda")["triton"])
    monkeypatch.setenv("ULTRON_KERNELS_AUTOTUNE", "1")
    from helpers import assert_parity

    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 96, 28, 28, device="cuda").to(memory_format=layout).requires_grad_()
        w = torch.randn(96, 3, 3, device="cuda", requires_grad=True)
        y = uk.channelwise_dilated_conv2d(x, w, None, (1, 3, 6), backend="triton")
        ref = uk.channelwise_dilated_conv2d(x.double(), w.double(), None, (1, 3, 6), backend="reference")
        assert_parity("autotuned conv", y, ref, torch.float32)
        g = torch.randn_like(y)
        assert_parity("autotuned conv dx", torch.autograd.grad(y, x, g)[0],
                      torch.autograd.grad(ref, x, g.double())[0], torch.float32)
    qkv = torch.randn(2, 28, 28, 3, 4, 32, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(169, 4, device="cuda")
    out = uk.window_attention(*qkv.unbind(3), 7, 3, table, backend="triton")
    ref = uk.window_attention(*qkv.double().unbind(3), 7, 3, table.double(), backend="reference")
    assert_parity("autotuned attention", out, ref, torch.bfloat16)


def test_missing_extension_message_says_how_to_build():
    why = _cuda._load("_not_built", "CUDA extension", "with nvcc and a CUDA build of torch")
    assert why.startswith("ultron_kernels was installed without its CUDA extension (ultron_kernels._not_built)")
    assert "pip install --no-build-isolation" in why and "circular import" not in why


def test_forced_cuda_build_with_cpu_torch_says_so():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, runpy, torch\n"
            "torch.version.cuda = None\n"
            "sys.argv = ['setup.py', '--version']\n"
            f"runpy.run_path({os.path.join(root, 'setup.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, ULTRON_KERNELS_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode != 0
    assert "is a CPU-only build (torch.version.cuda is None)" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("arch_list,capability,runs", [
    ("9.0", (9, 0), True), ("9.0", (8, 0), False), ("9.0", (10, 0), False),
    ("8.0", (8, 6), True), ("8.6", (8, 0), False), ("8.0;8.6;8.9;9.0+PTX", (8, 9), True),
    ("8.0;8.6;8.9;9.0+PTX", (12, 0), True), ("8.0;8.6;8.9;9.0+PTX", (7, 5), False),
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("8.0 8.6", (8, 6), True),
])
def test_kernel_image_rule(arch_list, capability, runs):
    assert _cuda.runs_on(arch_list, capability) is runs


def _fake_gpu(monkeypatch, capability, built):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(_cuda, "HAS_CUDA_EXTENSION", True)
    monkeypatch.setattr(_cuda, "built_arch_list", lambda: built)


def test_extension_without_the_gpus_architecture_says_so(monkeypatch):
    """An extension built for sm_90 on an sm_80 GPU: available_backends names both and the
    fix; auto skips it (never a 'no kernel image' error at the call)."""
    _fake_gpu(monkeypatch, (8, 0), "9.0")
    status = uk.available_backends("cuda")
    assert "TORCH_CUDA_ARCH_LIST='9.0'" in status["cuda"] and "sm_80" in status["cuda"], status
    assert "rebuild" in status["cuda"] and status["triton"] == "available"
    picked = select_backend("window_attention", "auto", torch.device("cuda"), lambda name: None)
    assert picked == "triton"
    with pytest.raises(uk.BackendUnavailableError, match="sm_80"):
        select_backend("window_attention", "cuda", torch.device("cuda"), lambda name: None)


def test_unsupported_gpu_falls_back_to_reference_with_one_warning(monkeypatch):
    _fake_gpu(monkeypatch, (7, 0), "8.0;8.6;8.9;9.0+PTX")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="sm_70") as caught:
        picked = select_backend("channelwise_dilated_conv2d", "auto", torch.device("cuda"), lambda name: None)
    assert picked == "reference" and len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend("channelwise_dilated_conv2d", "auto", torch.device("cuda"),
                              lambda name: None) == "reference"


def test_a_checkout_that_shadows_the_installed_package_is_named(tmp_path, monkeypatch):
    """Run from a source checkout, ultron_kernels is imported from there, without the built
    extensions of the installed copy: the message says so, not "installed without"."""
    import importlib.metadata

    from ultron_kernels import _cuda

    installed = tmp_path / "site-packages" / "ultron_kernels"
    installed.mkdir(parents=True)
    (installed / "_C_missing.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")

    class Entry:
        name = "_C_missing.cpython-311-x86_64-linux-gnu.so"

        def locate(self):
            return installed / self.name

    monkeypatch.setattr(importlib.metadata, "files", lambda name: [Entry()])
    why = _cuda._load("_C_missing", "CUDA host simulation", "")
    assert "a source checkout without its CUDA host simulation" in why and str(installed) in why, why
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [])
    assert _cuda._load("_C_missing", "CUDA host simulation", "").startswith("ultron_kernels was installed without")
