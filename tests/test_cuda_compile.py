"""Static gates for the CUDA kernels, on any machine with nvcc (tools/compile_cuda.py): every
kernel instance compiles for sm_90 and sm_75 and is checked for what the design promises
(tensor-core MMAs and cp.async in the tensor-core kernels, 16-byte loads in the vectorised
channels_last kernels, static shared memory within 48 KB, no register spills in the
attention kernels) and against the committed snapshot tests/snapshots/cuda_kernels.json
(registers, spills, shared memory: no kernel may get worse). ULTRON_KERNELS_UPDATE_SNAPSHOTS=1
rewrites the snapshot after a deliberate change."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "tests", "snapshots", "cuda_kernels.json")
ARCHS = (90, 75)
# Numbers that may not grow (a regression), per kernel instance.
NON_INCREASING = ("registers", "spill_stores", "spill_loads", "stack", "static_smem", "local")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if shutil.which("nvcc") is None:
        if os.environ.get("ULTRON_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail("nvcc not found")
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("cuda") / "kernels.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "compile_cuda.py"), "--json", str(out)]
    for arch in ARCHS:
        cmd += ["--arch", str(arch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if not out.exists():
        pytest.fail(f"tools/compile_cuda.py produced nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    return {(r["arch"], r["name"]): r for r in rows}


def test_static_shared_memory_within_48kb(kernels):
    over = {k: r["static_smem"] for k, r in kernels.items() if r["static_smem"] > 48 * 1024}
    assert not over, over


def test_tensor_core_kernels_use_mma_and_cp_async_on_sm90(kernels):
    tc = {name: r for (arch, name), r in kernels.items() if arch == 90 and "_tc_kernel" in name}
    assert len(tc) == 4, sorted(tc)
    for name, r in tc.items():
        assert r["hmma"] > 0 and r["ldgsts"] > 0, (name, r)
        assert r["spill_stores"] == 0 and r["local"] == 0, (name, r)


def test_tensor_core_kernels_trap_before_sm80(kernels):
    """Built for an architecture without bf16 wmma, the tensor-core kernels hold a trap and
    no MMA: never uninitialised output (the host does not launch them there either)."""
    tc = {name: r for (arch, name), r in kernels.items() if arch == 75 and "_tc_kernel" in name}
    assert len(tc) == 4, sorted(tc)
    for name, r in tc.items():
        assert r["hmma"] == 0 and r["trap"] > 0, (name, r)


def test_attention_kernels_do_not_spill(kernels):
    spills = {k: (r["spill_stores"], r["spill_loads"]) for k, r in kernels.items()
              if k[1].startswith("window_attn") and (r["spill_stores"] or r["spill_loads"])}
    assert not spills, spills


def test_vector_kernels_load_16_bytes_on_sm90(kernels):
    """channels_last with VEC > 1: each tap is one 16-byte load (LDG.E.128)."""
    vector = {k: r for k, r in kernels.items()
              if k[0] == 90 and re.match(r"gather_nhwc_kernel<.*, (4|8), (true|false)>", k[1])}
    assert vector
    narrow = {k: r["ldg128"] for k, r in vector.items() if r["ldg128"] == 0}
    assert not narrow, narrow


def test_no_kernel_regresses_against_the_snapshot(kernels):
    current = {f"sm_{arch} {name}": {key: r[key] for key in NON_INCREASING + ("hmma", "ldgsts", "ldg128")}
               for (arch, name), r in sorted(kernels.items())}
    if os.environ.get("ULTRON_KERNELS_UPDATE_SNAPSHOTS") == "1" or not os.path.exists(SNAPSHOT):
        with open(SNAPSHOT, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(SNAPSHOT) as f:
        snapshot = json.load(f)
    assert sorted(current) == sorted(snapshot), (
        "kernel instances changed: new " + str(sorted(set(current) - set(snapshot))) + ", gone "
        + str(sorted(set(snapshot) - set(current))) + " (ULTRON_KERNELS_UPDATE_SNAPSHOTS=1 to accept)")
    worse = {}
    for name, now in current.items():
        was = snapshot[name]
        grew = {key: (was[key], now[key]) for key in NON_INCREASING if now[key] > was[key]}
        lost = {key: (was[key], now[key]) for key in ("hmma", "ldgsts", "ldg128") if was[key] and not now[key]}
        if grew or lost:
            worse[name] = {**grew, **lost}
    assert not worse, worse
