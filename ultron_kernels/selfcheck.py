"""``python -m ultron_kernels``: what this machine has, and whether every backend computes the
right thing on it.

In the manner of ``python -m torch.utils.collect_env`` and ``python -m xformers.info``: the
environment (versions, GPU, architecture, shared memory), the architectures the CUDA
extension was built for, each backend's availability (with the reason when it is not), then
a parity self-test of every available backend, per op and dtype, forward and backward, on
small shapes against the reference in float64, and a table. Exit code 1 on any mismatch.

On a machine without a GPU it runs what can run: the reference, Triton through its
interpreter, and the CUDA kernels through their host simulation. ``--bench`` times one shape
per op on a GPU. ``--json [FILE]`` writes everything as JSON (to stdout without a FILE):
attach it to a bug report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _prepare_cpu_backends() -> None:
    """Without a GPU: Triton's interpreter (switched on before triton is imported) and the
    CUDA host simulation."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ULTRON_KERNELS_CUDA_SIM", "1")


def _extension_status() -> str:
    """The CUDA extension's state, in the words that matter on this machine: without a GPU it
    is not needed (the CUDA backend runs through the host simulation there)."""
    from ultron_kernels import _cuda
    from ultron_kernels.backends import no_cuda_device_reason

    if _cuda.HAS_CUDA_EXTENSION:
        return "loaded"
    if no_cuda_device_reason():
        return f"not built; not needed here ({no_cuda_device_reason()})"
    return _cuda.CUDA_EXTENSION_ERROR


def backend_mode(name: str, device: torch.device) -> str:
    """How an available backend runs on ``device``: on the CPU the fused backends are Triton's
    interpreter and the CUDA host simulation (exact but slow: no timing means anything)."""
    if device.type == "cpu" and name == "triton":
        return "available: Triton's interpreter on the CPU (TRITON_INTERPRET=1)"
    if device.type == "cpu" and name == "cuda":
        return "available: the CUDA kernels' host simulation on the CPU (ULTRON_KERNELS_CUDA_SIM=1)"
    return "available"


def backend_variable_problem() -> Optional[str]:
    """ULTRON_KERNELS_BACKEND set to something that is not a backend: every ``auto`` call
    would raise. The self-check says so instead of passing."""
    from ultron_kernels.backends import BACKENDS, ENV_VAR

    value = os.environ.get(ENV_VAR)
    if value and value not in ("auto",) + BACKENDS:
        return (f"{ENV_VAR}={value!r} is not a backend (choose from {('auto',) + BACKENDS}): every "
                "call with backend='auto' raises ValueError until it is fixed or unset")
    return None


def environment() -> dict:
    import ultron_kernels
    from ultron_kernels import _cuda

    info = {
        "ultron_kernels": ultron_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_extension_archs": _cuda.built_arch_list() or None,
        "cuda_extension": _extension_status(),
        "cuda_simulation": ("off" if not _cuda.simulation_enabled()
                            else _cuda.simulation_reason() or "on (CUDA kernels run on the CPU)"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "gpus": [],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["driver"] = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else None
        for index in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(index)
            info["gpus"].append({"index": index, "name": p.name, "arch": f"sm_{p.major}{p.minor}",
                                 "sms": p.multi_processor_count,
                                 "shared_memory_per_block_optin": p.shared_memory_per_block_optin,
                                 "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


# ---------------------------------------------------------------- parity self-test

def _attention_case(dtype, device, backend):
    """Shifted 7x7 windows on a 9x11 grid (partial windows), 2 heads of 32, table bias."""
    from ultron_kernels import window_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 11, 2, 32, generator=gen) for _ in range(3))
    table = torch.randn(13 * 13, 2, generator=gen)
    grad = torch.randn(2, 9, 11, 2, 32, generator=gen)
    return _run(lambda *t: window_attention(t[0], t[1], t[2], 7, 3, t[3], backend=backend),
                (q, k, v, table), grad, dtype, device)


def _rel_pos_case(dtype, device, backend):
    """SAM's decomposed relative position: a global block over a 9x11 grid (two key blocks of
    the Triton kernels), 2 heads of 32."""
    from ultron_kernels import window_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 11, 2, 32, generator=gen) for _ in range(3))
    tables = [torch.randn(2 * size - 1, 32, generator=gen) * 0.2 for size in (9, 11)]
    grad = torch.randn(1, 9, 11, 2, 32, generator=gen)
    return _run(lambda q, k, v, *t: window_attention(q, k, v, (9, 11), rel_pos=tuple(t), backend=backend),
                (q, k, v, *tables), grad, dtype, device)


def _conv_case(dtype, device, backend):
    """3x3 depthwise, dilations 1/2/3 over channel groups, stride 1, odd sizes."""
    from ultron_kernels import channelwise_dilated_conv2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 13, 11, generator=gen)
    weight = torch.randn(12, 1, 3, 3, generator=gen) / 3
    bias = torch.randn(12, generator=gen)
    grad = torch.randn(2, 12, 13, 11, generator=gen)
    return _run(lambda *t: channelwise_dilated_conv2d(t[0], t[1], t[2], [1, 2, 3], backend=backend),
                (x, weight, bias), grad, dtype, device)


def _grouped_conv_case(dtype, device, backend):
    """InceptionNeXt's mix (identity, 3x3, 1x7 and 7x1 bands) and a TF-'SAME' 4x4, odd sizes."""
    from ultron_kernels import DepthwiseGroup as G
    from ultron_kernels import grouped_depthwise_conv2d

    groups = [G.identity(3), G(4, 3), G(3, (1, 7)), G(3, (7, 1)), G(3, 4, padding="tf_same")]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 9, 7, generator=gen)
    weights = [torch.randn(g.channels, 1, *((g.kernel_size,) * 2 if isinstance(g.kernel_size, int)
                                            else g.kernel_size), generator=gen) / 3 for g in groups[1:]]
    grad = torch.randn(1, 16, 9, 7, generator=gen)
    return _run(lambda x, *w: grouped_depthwise_conv2d(x, [None, *w], groups, backend=backend),
                (x, *weights), grad, dtype, device)


def _run(op: Callable, inputs, grad, dtype, device):
    """Output and input gradients of ``op`` on ``inputs`` cast to ``dtype`` on ``device``."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    out = op(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))
    return [out.detach(), *grads]


OPS = {"window_attention": _attention_case, "window_attention rel_pos": _rel_pos_case,
       "channelwise_dilated_conv2d": _conv_case, "grouped_depthwise_conv2d": _grouped_conv_case}
SHAPES = {"window_attention": "B2 9x11 (partial windows) heads 2 D32, window 7 shift 3, table bias",
          "window_attention rel_pos": "B1 9x11 heads 2 D32, one 9x11 window, SAM's decomposed rel_pos",
          "channelwise_dilated_conv2d": "B2 C12 13x11, k3, dilations 1/2/3 per 4 channels, bias",
          "grouped_depthwise_conv2d": "B1 C16 9x7: identity 3, 3x3 x4, 1x7 x3, 7x1 x3, 4x4 tf_same x3"}
OUTPUT_NAMES = {"window_attention": ("out", "dq", "dk", "dv", "dbias"),
                "window_attention rel_pos": ("out", "dq", "dk", "dv", "drel_pos_h", "drel_pos_w"),
                "channelwise_dilated_conv2d": ("out", "dx", "dweight", "dbias"),
                "grouped_depthwise_conv2d": ("out", "dx", "dw_3x3", "dw_1x7", "dw_7x1", "dw_4x4")}


def parity_checks(device: torch.device, backends: list[str]) -> list[dict]:
    """One row per (backend, op, dtype): the worst output or gradient against float64."""
    from ultron_kernels.testing import parity

    rows = []
    for op_name, case in OPS.items():
        expected = case(torch.float64, torch.device("cpu"), "reference")
        for backend in backends:
            for dtype_name, dtype in DTYPES.items():
                row = {"backend": backend, "op": op_name, "dtype": dtype_name, "device": str(device),
                       "shape": SHAPES[op_name]}
                start = time.perf_counter()
                try:
                    got = case(dtype, device, backend)
                    results = {name: parity(g, e, dtype)
                               for name, g, e in zip(OUTPUT_NAMES[op_name], got, expected)}
                    worst = max(results, key=lambda n: (not results[n].ok, results[n].relative))
                    row.update(ok=all(r.ok for r in results.values()),
                               worst=f"{worst}: {results[worst]}",
                               relative_errors={n: r.relative for n, r in results.items()})
                except Exception as exc:  # a crash is a failed check, reported with the rest
                    row.update(ok=False, worst=f"{type(exc).__name__}: {exc}"[:500])
                row["seconds"] = round(time.perf_counter() - start, 2)
                rows.append(row)
    return rows


# ---------------------------------------------------------------- quick benchmark (GPU)

def quick_bench(backends: list[str]) -> list[dict]:
    """One bf16 shape per op (Swin-T stage 1; a ULTRON-S conv layer), forward + backward, in
    milliseconds (median of triton.testing.do_bench), against the PyTorch reference path."""
    import triton.testing

    from ultron_kernels import channelwise_dilated_conv2d, window_attention

    device, dtype = torch.device("cuda"), torch.bfloat16
    q, k, v = (torch.randn(32, 56, 56, 3, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn(13 * 13, 3, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(32, 96, 56, 56, device=device, dtype=dtype, requires_grad=True).to(memory_format=torch.channels_last)
    weight = torch.randn(96, 1, 3, 3, device=device, dtype=dtype, requires_grad=True)
    shapes = {
        "window_attention": ("B32 56x56 3x32 window 7 shift 3, bf16",
                             lambda b: window_attention(q, k, v, 7, 3, table, backend=b)),
        "channelwise_dilated_conv2d": ("B32 C96 56x56 k3 d1/2/3, channels_last bf16",
                                       lambda b: channelwise_dilated_conv2d(x, weight, None, [1, 2, 3], backend=b)),
    }
    rows = []
    for op_name, (shape, call) in shapes.items():
        for backend in ["reference"] + [b for b in backends if b != "reference"]:
            def step(b=backend):
                call(b).float().sum().backward()
            try:
                ms = triton.testing.do_bench(step, quantiles=[0.5])
                rows.append({"op": op_name, "shape": shape, "backend": backend, "ms": round(ms, 4)})
            except Exception as exc:
                rows.append({"op": op_name, "shape": shape, "backend": backend, "error": str(exc)[:300]})
    return rows


# ---------------------------------------------------------------- report

def _table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ultron_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time one shape per op (needs a GPU)")
    parser.add_argument("--json", metavar="FILE", nargs="?", const="-",
                        help="write the report as JSON to FILE (no FILE, or '-': to stdout)")
    parser.add_argument("--device", default=None, help="device to check (default: cuda if present, else cpu)")
    args = parser.parse_args(argv)

    _prepare_cpu_backends()
    from ultron_kernels import available_backends
    from ultron_kernels.backends import no_cuda_device_reason

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    report = {"environment": environment(), "device": str(device),
              "backends": available_backends(device)}
    missing_device = no_cuda_device_reason() if device.type == "cuda" else None
    report["problems"] = [p for p in (backend_variable_problem(), missing_device) if p]
    runnable = [name for name, why in report["backends"].items() if why == "available"]
    report["backend_modes"] = {name: backend_mode(name, device) for name in runnable}
    report["checks"] = parity_checks(device, runnable)  # none runnable without the device
    if args.bench:
        report["bench"] = quick_bench(runnable) if device.type == "cuda" and runnable else \
            "timings need a GPU: this machine has none"
    ok = all(row["ok"] for row in report["checks"]) and not report["problems"]
    report["ok"] = ok

    out = sys.stdout if args.json != "-" else sys.stderr
    env = report["environment"]
    print("ultron_kernels self-check", file=out)
    for key, value in env.items():
        if key != "gpus":
            print(f"  {key}: {value}", file=out)
    for gpu in env["gpus"]:
        print(f"  gpu {gpu['index']}: {gpu['name']} ({gpu['arch']}, {gpu['sms']} SMs, "
              f"{gpu['shared_memory_per_block_optin']} B shared memory per block)", file=out)
    print(f"\nbackends on {device}:", file=out)
    for name, why in report["backends"].items():
        print(f"  {name}: {report['backend_modes'].get(name, why)}", file=out)
    for problem in report["problems"]:
        print(f"\nPROBLEM: {problem}", file=out)
    if report["checks"]:
        print("\nparity against float64 (forward and every gradient), on these shapes:", file=out)
        for op_name, shape in SHAPES.items():
            print(f"  {op_name}: {shape}", file=out)
        print(_table([dict(r, result="ok" if r["ok"] else "MISMATCH") for r in report["checks"]],
                     ["backend", "op", "dtype", "result", "worst", "seconds"]), file=out)
    if args.bench:
        print("\nquick benchmark (forward + backward, ms):", file=out)
        print(report["bench"] if isinstance(report["bench"], str) else
              _table(report["bench"], ["op", "shape", "backend", "ms", "error"]), file=out)
    if ok:
        verdict = "all checks passed"
    elif report["problems"]:
        verdict = "FAILED: see PROBLEM above"
    else:
        verdict = ("MISMATCH: see the rows above; attach `python -m ultron_kernels --json report.json` "
                   "to a bug report")
    print("\n" + verdict, file=out)
    if args.json:
        text = json.dumps(report, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if ok else 1
