"""Loads the compiled extension ``ultron_kernels._C`` (csrc/), if it was built.

Importing it registers the ``ultron_kernels_cuda::*`` operators with PyTorch. When the
extension is missing, ``HAS_CUDA_EXTENSION`` is False and ``CUDA_EXTENSION_ERROR`` says why,
so that backend selection can report the reason instead of failing later.
"""

from __future__ import annotations

import torch

HAS_CUDA_EXTENSION = False
CUDA_EXTENSION_ERROR = ""

try:
    from ultron_kernels import _C  # noqa: F401  (import registers the operators)

    HAS_CUDA_EXTENSION = True
except ImportError as exc:  # the extension is optional: pure-Python installs have no _C
    CUDA_EXTENSION_ERROR = (
        f"ultron_kernels._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` on a machine with nvcc and a CUDA-enabled torch"
    )


def cuda_ops():
    """The namespace of the compiled operators; raises with the reason if not built."""
    if not HAS_CUDA_EXTENSION:
        raise RuntimeError(CUDA_EXTENSION_ERROR)
    return torch.ops.ultron_kernels_cuda
