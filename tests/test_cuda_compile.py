"""Static gates for the CUDA kernels, on any machine with nvcc (tools/compile_cuda.py): every
kernel instance compiles for sm_80, sm_86, sm_89, sm_90 (and sm_75, where the tensor-core
bodies must be traps) and is checked for what the design promises
(tensor-core MMAs and cp.async in the tensor-core kernels, 16-byte loads in the vectorised
channels_last kernels, static shared memory within 48 KB, no register spills in the
attention kernels) and against the committed snapshot tests/snapshots/cuda_kernels.json
(registers, spills, shared memory: no kernel may get worse). ULTRON_KERNELS_UPDATE_SNAPSHOTS=1
rewrites the snapshot after a deliberate change."""

import os
import re
import shutil
import sys

import pytest

from helpers import ROOT, check_snapshot, static_gate_rows

sys.path.insert(0, os.path.join(ROOT, "tools"))
from gpu_archs import ARCHS, occupancy  # noqa: E402

SNAPSHOT = os.path.join(ROOT, "tests", "snapshots", "cuda_kernels.json")
# Numbers that may not grow (a regression), per kernel instance.
NON_INCREASING = ("registers", "spill_stores", "spill_loads", "stack", "static_smem", "local")


@pytest.fixture(scope="module")
def kernels():
    if shutil.which("nvcc") is None:
        if os.environ.get("ULTRON_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail("nvcc not found")
        pytest.skip("nvcc not found")
    rows = static_gate_rows("test_cuda_compile.py")
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    return {(r["arch"], r["name"]): r for r in rows}


def test_every_architecture_is_compiled(kernels):
    per_arch = {sm: {name for arch, name in kernels if arch == sm} for sm in list(ARCHS) + [75]}
    assert all(per_arch.values()) and len({frozenset(n) for n in per_arch.values()}) == 1, {
        sm: len(names) for sm, names in per_arch.items()}


def test_static_shared_memory_within_48kb(kernels):
    over = {k: r["static_smem"] for k, r in kernels.items() if r["static_smem"] > 48 * 1024}
    assert not over, over


def test_tensor_core_kernels_use_mma_and_cp_async_from_sm80(kernels):
    for sm in ARCHS:
        tc = {name: r for (arch, name), r in kernels.items() if arch == sm and "_tc_kernel" in name}
        assert len(tc) == 8, (sm, sorted(tc))  # fwd/bwd x fp16/bf16 x 2D/3D windows
        for name, r in tc.items():
            assert r["hmma"] > 0 and r["ldgsts"] > 0, (sm, name, r)
            assert r["spill_stores"] == 0 and r["local"] == 0, (sm, name, r)


def test_tensor_core_kernels_trap_before_sm80(kernels):
    """Built for an architecture without bf16 wmma, the tensor-core kernels hold a trap and
    no MMA: never uninitialised output (the host does not launch them there either)."""
    tc = {name: r for (arch, name), r in kernels.items() if arch == 75 and "_tc_kernel" in name}
    assert len(tc) == 8, sorted(tc)
    for name, r in tc.items():
        assert r["hmma"] == 0 and r["trap"] > 0, (name, r)


def test_attention_kernels_do_not_spill(kernels):
    spills = {k: (r["spill_stores"], r["spill_loads"]) for k, r in kernels.items()
              if k[1].startswith("window_attn") and (r["spill_stores"] or r["spill_loads"])}
    assert not spills, spills


def test_vector_kernels_load_16_bytes(kernels):
    """channels_last with VEC > 1: each tap is one 16-byte load (LDG.E.128), on every arch."""
    vector = {k: r for k, r in kernels.items()
              if k[0] in ARCHS and re.match(r"gather_nhwc_kernel<.*, (4|8), (true|false)>", k[1])}
    assert vector
    narrow = {k: r["ldg128"] for k, r in vector.items() if r["ldg128"] == 0}
    assert not narrow, narrow


def test_no_kernel_regresses_against_the_snapshot(kernels):
    current = {f"sm_{arch} {name}": {key: r[key] for key in NON_INCREASING + ("hmma", "ldgsts", "ldg128")}
               for (arch, name), r in sorted(kernels.items())}
    check_snapshot(SNAPSHOT, current, NON_INCREASING, must_keep=("hmma", "ldgsts", "ldg128"))


def _simulated_launches(arch: str, monkeypatch) -> dict:
    """{kernel: (threads per block, dynamic shared bytes)} that the host code chooses on a
    simulated ``arch`` for a representative set of calls (the CUDA host simulation)."""
    import torch

    import ultron_kernels as uk

    if uk.available_backends("cpu")["cuda"] != "available":
        pytest.skip(uk.available_backends("cpu")["cuda"])
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM_ARCH", arch)
    sim = torch.ops.ultron_kernels_cuda_sim
    sim.take_launch_log()
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (32, 64):
            q, k, v = (torch.randn(1, 7, 7, 2, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
            uk.window_attention(q, k, v, 7, 3, None, backend="cuda").sum().backward()
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(1, 16, 9, 9, dtype=dtype).to(memory_format=layout).requires_grad_()
            weight = torch.randn(16, 1, 3, 3, dtype=dtype, requires_grad=True)
            uk.channelwise_dilated_conv2d(x, weight, None, [1, 2], backend="cuda").sum().backward()
    chosen = {}
    for line in sim.take_launch_log():
        name = line.split(" grid=")[0]
        block = re.search(r"block=\((\d+),(\d+),(\d+)\)", line)
        threads = int(block[1]) * int(block[2]) * int(block[3])
        smem = int(re.search(r"smem=(\d+)", line)[1])
        previous = chosen.get(name, (0, 0))
        chosen[name] = (max(previous[0], threads), max(previous[1], smem))
    return chosen


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_host_choices_fit_and_occupy_every_architecture(kernels, arch, monkeypatch):
    """On each architecture, the host's choices (tensor cores for 16-bit attention from sm_80,
    block size, dynamic shared memory) fit that architecture (static + dynamic shared memory
    within its opt-in limit) and leave at least one resident block per SM; the resident
    blocks per SM (NVIDIA's occupancy calculator) are snapshotted."""
    launched = _simulated_launches(str(arch), monkeypatch)
    assert "window_attn_fwd_tc_kernel<c10::BFloat16, false>" in launched, sorted(launched)
    limit = ARCHS[arch].shared_optin
    rows = [(name, kernels[(arch, name)], threads, smem) for name, (threads, smem) in sorted(launched.items())]
    over = {name: r["static_smem"] + smem for name, r, _, smem in rows if r["static_smem"] + smem > limit}
    assert not over, (limit, over)
    blocks = occupancy([(arch, r["registers"], threads, r["static_smem"], smem) for _, r, threads, smem in rows])
    current = {f"sm_{arch} {name}": {"threads": threads, "dynamic_smem": smem, "blocks_per_sm": b}
               for (name, _, threads, smem), b in zip(rows, blocks)}
    assert all(b >= 1 for b in blocks), current
    check_snapshot(os.path.join(ROOT, "tests", "snapshots", f"cuda_occupancy_sm{arch}.json"), current,
                   non_increasing=("dynamic_smem",), non_decreasing=("blocks_per_sm",),
                   unchanged=("threads",))


def test_built_extension_holds_every_architecture_it_claims():
    """ultron_kernels._C reports the TORCH_CUDA_ARCH_LIST it was built with; its fat binary
    holds machine code for each of those architectures (and PTX where '+PTX' says so)."""
    import glob
    import subprocess

    import torch
    import triton

    from ultron_kernels import _cuda

    if not _cuda.HAS_CUDA_EXTENSION:
        pytest.skip(_cuda.CUDA_EXTENSION_ERROR)
    arch_list = _cuda.built_arch_list()
    library = glob.glob(os.path.join(os.path.dirname(_cuda.__file__), "_C.*.so"))[0]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    listed = {kind: set(re.findall(r"sm_(\d+)", subprocess.run([tool, f"--list-{kind}", library],
                                                                capture_output=True, text=True).stdout))
              for kind in ("elf", "ptx")}
    for entry in arch_list.split(";"):
        sm = entry.split("+")[0].replace(".", "")
        assert sm in listed["elf"], (entry, listed)
        if entry.endswith("+PTX"):
            assert sm in listed["ptx"], (entry, listed)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        assert arch_list == "8.0;8.6;8.9;9.0+PTX"  # the documented default without a GPU
