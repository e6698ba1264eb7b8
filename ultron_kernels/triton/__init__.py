"""The Triton kernels. With Triton's interpreter on (TRITON_INTERPRET=1, the CPU path), importing
them first fixes the interpreter's 16-bit arithmetic (interpreter.py), wherever they run."""

import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from ultron_kernels.triton.interpreter import use_gpu_numerics

    use_gpu_numerics()
