"""Every Triton launch the package can make, compiled for sm_80, sm_86, sm_89 and sm_90 without
a GPU (tools/compile_triton.py, in its own process without TRITON_INTERPRET): the launcher's
own choice of configuration fits each architecture's shared memory, the autotuners drop
exactly the configurations that do not, the design promises hold (tensor cores and 16-byte
loads where meant), and nothing regresses against tests/snapshots/triton_kernels.json."""

import os
import sys

import pytest

from helpers import ROOT, check_snapshot, static_gate_rows

sys.path.insert(0, os.path.join(ROOT, "tools"))
from gpu_archs import ARCHS  # noqa: E402

SNAPSHOT = os.path.join(ROOT, "tests", "snapshots", "triton_kernels.json")


@pytest.fixture(scope="module")
def compiled():
    rows = static_gate_rows("test_triton_compile.py")
    return {(r["arch"], r["name"]): r for r in rows}


def test_every_launch_compiles_and_fits_every_architecture(compiled):
    failed = {k: r.get("error", f"{r.get('shared_bytes')} B > {r['limit']} B")
              for k, r in compiled.items() if r["kind"] == "launch" and not r["ok"]}
    assert not failed, failed
    for sm in ARCHS:
        launches = [r for (arch, _), r in compiled.items() if arch == sm and r["kind"] == "launch"]
        assert any(r["name"].startswith("attention bwd") for r in launches), sm
        assert any(r["name"].startswith("conv grad-weight") for r in launches), sm
        assert all(r["blocks_per_sm"] >= 1 for r in launches), sm


def test_configurations_over_the_limit_are_pruned(compiled):
    """The 99 KB parts cannot hold fp32 attention at D=128 with the preferred tile: the
    launcher moves to the next candidate (one stage, then a half-size query/key block), and
    the autotuner drops its configurations that do not fit. Every rejection is a real one."""
    rejected = {k: r["rejected"] for k, r in compiled.items() if r["kind"] == "launch" and r["rejected"]}
    assert (86, "attention bwd fp32 d128 window7x7") in rejected
    assert (89, "attention fwd fp32 d128 window7x7") in rejected
    assert not any(arch == 90 for arch, _ in rejected), rejected
    assert compiled[(86, "attention bwd fp32 d128 window7x7")]["config"].startswith("BLOCK=32")
    for (arch, name), reasons in rejected.items():
        for reason in reasons:
            assert int(reason.rsplit(": ", 1)[1].split()[0]) > ARCHS[arch].shared_optin, (arch, name, reason)
    tuned = [r for r in compiled.values() if r["kind"] == "autotune"]
    assert tuned and all(r["ok"] for r in tuned), [r for r in tuned if not r["ok"]]
    assert any(r["pruned"] for r in tuned) and not all(r["pruned"] for r in tuned)


def test_attention_uses_tensor_cores_and_wide_loads(compiled):
    for sm in ARCHS:
        fwd = compiled[(sm, "attention fwd bf16 d32 window7x7")]
        assert fwd["mma"] > 0 and fwd["vector_loads"] > 0, (sm, fwd)
        assert compiled[(sm, "attention bwd bf16 d64 window7x7")]["mma"] > 0, sm


def test_channels_last_conv_loads_are_vectorised_when_blocks_are_full(compiled):
    for sm in ARCHS:
        for dtype in ("bf16", "fp32"):
            assert compiled[(sm, f"conv fwd nhwc {dtype} full s1")]["vector_loads"] > 0, (sm, dtype)


def test_large_kernel_convs_run_on_tensor_cores_without_spilling(compiled):
    """The banded kernels (forward, grad input, grad weight) are tl.dot loops: mma on every
    architecture, nothing in local memory, at least one block per SM."""
    for sm in ARCHS:
        banded = [r for (arch, name), r in compiled.items() if arch == sm and name.startswith("conv band")]
        assert len(banded) == 15, sm
        for r in banded:
            assert r["mma"] > 0 and r["local_bytes"] == 0 and r["blocks_per_sm"] >= 1, (sm, r)


def test_rel_pos_attention_runs_on_tensor_cores_without_spilling(compiled):
    """SAM's decomposed relative position (global 64 x 64 and 14 x 14 windows; SAM-H's head
    dim 80 too): the forward, softmax-term pre-pass, dq and dk/dv kernels have no local spill
    slots and a block per SM at least; in 16-bit the attention kernels run on mma (fp32 dots
    are IEEE here, as on the CPU; the pre-pass has no dot). SAM's own configuration (16-bit,
    D64) keeps its stack frame (local memory too) under 512 bytes; fp32 and D128 take
    kilobytes on some architectures, as the other fp32 attention launches do
    (bench/NOTES.md v0.11)."""
    for sm in ARCHS:
        rel_pos = [r for (arch, name), r in compiled.items() if arch == sm and "relpos" in name]
        assert len(rel_pos) == 20, sm
        for r in rel_pos:
            assert r["local_bytes"] == 0 and r["blocks_per_sm"] >= 1, (sm, r)
            assert r["mma"] > 0 or " fp32 " in r["name"] or "bwd-delta" in r["name"], (sm, r)
            if " bf16 d64 " in r["name"]:
                assert r["stack_bytes"] <= 512, (sm, r)


def test_no_launch_regresses_against_the_snapshot(compiled):
    current = {f"sm_{arch} {name}": {key: r[key] for key in
                                     ("config", "shared_bytes", "registers", "stack_bytes",
                                      "blocks_per_sm", "mma", "vector_loads")}
               for (arch, name), r in sorted(compiled.items()) if r["kind"] == "launch"}
    check_snapshot(SNAPSHOT, current, non_increasing=("shared_bytes", "registers", "stack_bytes"),
                   non_decreasing=("blocks_per_sm",), must_keep=("mma", "vector_loads"),
                   unchanged=("config",))  # the chosen configuration: a change must be deliberate

