"""The NVIDIA architectures the kernels are built and checked for, with the numbers of each
that decide what fits (CUDA C++ Programming Guide, "Compute Capabilities" tables), and the
occupancy they give a kernel (NVIDIA's cuda_occupancy.h, through tools/occupancy.cpp).

One table, used by tools/compile_cuda.py and tools/compile_triton.py and their tests.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_headers import cuda_header_dirs  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arch:
    sm: int
    gpus: str
    threads_per_sm: int
    shared_per_sm: int      # bytes, the largest carve-out
    shared_optin: int       # bytes one block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize)

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.sm, 10)


ARCHS = {
    80: Arch(80, "A100, A30", 2048, 167936, 166912),
    86: Arch(86, "A10, A40, RTX 3090, RTX A6000", 1536, 102400, 101376),
    89: Arch(89, "L4, L40, RTX 4090, RTX 6000 Ada", 1536, 102400, 101376),
    90: Arch(90, "H100, H200", 2048, 233472, 232448),
}
# sm_75 (T4) is compiled too, to check that the tensor-core bodies become traps there.
OLDER = {75: Arch(75, "T4", 1024, 65536, 65536)}


def occupancy(kernels: list[tuple[int, int, int, int, int]]) -> list[int]:
    """Resident blocks per SM for each (sm, registers per thread, threads per block, static
    shared bytes, dynamic shared bytes); 0 when the block cannot run at all."""
    if not kernels:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "occupancy")
        subprocess.run(["g++", "-std=c++17", "-O1", *(f"-I{d}" for d in cuda_header_dirs()),
                        os.path.join(ROOT, "tools", "occupancy.cpp"), "-o", exe], check=True)
        table = {**ARCHS, **OLDER}
        lines = []
        for sm, regs, threads, static, dynamic in kernels:
            arch = table[sm]
            lines.append(f"{arch.capability[0]} {arch.capability[1]} {arch.threads_per_sm} "
                         f"{arch.shared_per_sm} {arch.shared_optin} {regs} {threads} {static} {dynamic}")
        out = subprocess.run([exe], input="\n".join(lines) + "\n", capture_output=True, text=True,
                             check=True).stdout.split("\n")
    return [max(0, int(line.split()[0])) for line in out if line.strip()]
