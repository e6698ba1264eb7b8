"""Where the host-usable CUDA headers are (cuda_fp16.h, cuda_bf16.h, vector_types.h): the
CUDA host simulation compiles the kernels against them with a plain C++ compiler. Used by
setup.py (the ultron_kernels._C_sim build) and by the simulation's own tests; no GPU and no
nvcc needed, pip's nvidia runtime headers serve as well as a toolkit."""

from __future__ import annotations

import os
import shutil


def cuda_header_dirs() -> list[str]:
    """The first folder found that holds cuda_fp16.h and what it includes, as a one-element
    list (or empty)."""
    candidates = [os.path.join(os.environ[var], "include")
                  for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates.append("/usr/local/cuda/include")  # the toolkit's conventional place
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += [os.path.join(root, "cu13", "include"), os.path.join(root, "cuda_runtime", "include")]
    except ImportError:
        pass
    return [d for d in candidates
            if all(os.path.exists(os.path.join(d, h)) for h in ("cuda_fp16.h", "crt/host_defines.h"))][:1]
