"""The CUDA host simulation itself (csrc/sim/cuda_sim.h) must catch what breaks kernels on a
GPU. tests/cuda_sim/planted_bugs.cpp holds tiny kernels, each correct and deliberately
broken; this builds it with the C++ compiler (plainly and under AddressSanitizer) and checks
that every correct variant passes and every broken one is caught, in both of the
simulation's thread orders. The CUDA backend's real kernels run through the same simulation
in the parity suites (ultron_kernels._C_sim)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_headers import cuda_header_dirs  # noqa: E402

SOURCE = os.path.join(ROOT, "tests", "cuda_sim", "planted_bugs.cpp")
# case -> how its broken variant is caught: "mismatch" (the poisoned shared memory or the
# race reaches the results), "sim:<text>" (the simulation reports it), "asan:<text>" (only
# AddressSanitizer sees it: a global access outside any buffer).
CASES = {
    "missing_barrier": "mismatch",
    "missing_trailing_barrier": "mismatch",
    "early_cp_async_wait": "mismatch",
    "shared_store_past_end": "sim:wrote past the end of its 800 bytes of dynamic shared memory",
    "global_read_past_end": "asan:heap-buffer-overflow",
    "global_store_past_end": "asan:heap-buffer-overflow",
    "divergent_barrier": "sim:deadlock",
    "wmma_misaligned": "sim:the pointer must be 32-byte aligned",
}
KERNEL_OF = {"global_read_past_end": "neighbour_sum", "global_store_past_end": "scale_store"}


def _build(out_dir, sanitize: bool) -> str:
    compiler = shutil.which("g++") or shutil.which("c++")
    headers = cuda_header_dirs()
    if compiler is None or not headers:
        why = "no C++ compiler" if compiler is None else "no CUDA headers (cuda_fp16.h)"
        if os.environ.get("ULTRON_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(why)
        pytest.skip(why)
    exe = str(out_dir / ("planted_bugs_asan" if sanitize else "planted_bugs"))
    flags = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    cmd = [compiler, "-std=c++20", "-O1", "-g", "-DULTRON_CUDA_SIM", "-I", os.path.join(ROOT, "csrc"),
           "-I", headers[0], SOURCE, "-o", exe] + flags
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_sim")
    return {"plain": _build(out, False), "asan": _build(out, True)}


def _run(exe: str, case: str, variant: str, order: str):
    env = dict(os.environ, ULTRON_KERNELS_CUDA_SIM_ORDER=order, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([exe, case, variant], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("build", ["plain", "asan"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_correct_kernel_passes(programs, case, build, order):
    proc = _run(programs[build], case, "correct", order)
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("build", ["plain", "asan"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_kernel_is_caught(programs, case, build, order):
    how = CASES[case]
    proc = _run(programs[build], case, "broken", order)
    report = proc.stdout + proc.stderr
    if how == "mismatch":
        assert proc.returncode == 1 and "MISMATCH" in proc.stdout, report[-3000:]
    elif how.startswith("sim:"):
        if build == "asan" and case == "shared_store_past_end":
            # AddressSanitizer stops the store itself: the canary after dynamic shared
            # memory is poisoned for it.
            assert "use-after-poison" in report and "stage_dynamic" in report, report[-3000:]
        else:
            assert proc.returncode == 2 and how[4:] in proc.stdout, report[-3000:]
    elif build == "asan":
        assert proc.returncode != 0 and how[5:] in report, report[-3000:]
        assert KERNEL_OF[case] in report and "ultron cuda sim: in " + KERNEL_OF[case] in report, report[-3000:]
    else:
        # Without AddressSanitizer the simulation cannot see a read outside every buffer; a
        # store one past the end shifts the results and shows as a mismatch.
        if case == "global_store_past_end":
            assert proc.returncode == 1, report[-3000:]


def test_real_kernels_under_address_sanitizer(tmp_path):
    """tests/cuda_sim/asan_driver.cpp runs the CUDA backend's own kernels (the raw ops, every
    host path) through the simulation in an AddressSanitizer build: no access outside a
    tensor, in any kernel. (The counterpart of compute-sanitizer memcheck on a GPU.)"""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = shutil.which("g++") or shutil.which("c++")
    headers = cuda_header_dirs()
    if compiler is None or not headers:
        pytest.skip("no C++ compiler or no CUDA headers")
    exe = str(tmp_path / "asan_driver")
    libs = library_paths()[0]
    # -O0: compiling is most of this test's time (the workload is small); -O1 took half again
    # as much CPU for the same checks.
    flags = ["-std=c++20", "-O0", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-DULTRON_CUDA_SIM",
             "-I", os.path.join(ROOT, "csrc"), "-I", headers[0], *[f"-I{p}" for p in include_paths()]]
    sources = [os.path.join(ROOT, "csrc", "sim", "grouped_depthwise_conv_sim.cpp"),
               os.path.join(ROOT, "csrc", "sim", "window_attention_sim.cpp"),
               os.path.join(ROOT, "tests", "cuda_sim", "asan_driver.cpp")]
    objects = [str(tmp_path / (os.path.basename(src) + ".o")) for src in sources]
    # One compiler per source, at once: the two kernel sources take most of a minute each.
    compiles = [subprocess.Popen([compiler, *flags, "-c", src, "-o", obj], stderr=subprocess.PIPE, text=True)
                for src, obj in zip(sources, objects)]
    for proc in compiles:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    proc = subprocess.run([compiler, "-fsanitize=address", *objects, f"-L{libs}", "-ltorch_cpu", "-lc10",
                           f"-Wl,-rpath,{libs}", "-o", exe], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    env.pop("ULTRON_KERNELS_CUDA_SIM_SMS", None)
    run = subprocess.run([exe], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0 and "PASS" in run.stdout, (run.stdout + run.stderr)[-6000:]
