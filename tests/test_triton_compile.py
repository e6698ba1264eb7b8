"""Every Triton kernel compiles for sm_90 (H100/H200) within the shared-memory limit, and
the loads meant to be 16 bytes wide are: checked on any machine, GPU or not, through
tools/compile_triton.py (run without TRITON_INTERPRET, in its own process)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_triton.py"),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"tools/compile_triton.py produced nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {r["name"]: r for r in json.loads(out.read_text())}


def test_every_kernel_compiles_for_sm90_within_shared_memory(compiled):
    failed = {name: r.get("error", f"{r.get('shared_bytes')} bytes of shared memory")
              for name, r in compiled.items() if not r["ok"]}
    assert not failed, failed
    assert any(name.startswith("conv") for name in compiled)
    assert any(name.startswith("attention bwd") for name in compiled)


def test_channels_last_conv_loads_are_vectorised_when_dilation_is_uniform(compiled):
    for element in ("bf16", "fp32"):
        assert compiled[f"conv fwd nhwc {element} k3 uniform-dilation"]["vector_loads"] > 0


def test_attention_uses_tensor_cores_and_wide_loads_for_bf16(compiled):
    fwd = compiled["attention fwd bf16 d32 window7x7"]
    assert fwd["mma"] > 0 and fwd["vector_loads"] > 0
    assert compiled["attention bwd bf16 d32 window7x7"]["mma"] > 0
