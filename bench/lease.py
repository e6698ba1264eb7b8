"""The headline rows of `make gpu-lease` (tools/gpu_lease.py), run by one worker process.

``python -m bench.lease --rows ID[,ID...] --mode eager|compiled [--rehearse]`` runs the
rows in order and reports each on stdout as one line ``LEASE {json}``: ``meta`` first (the
device, versions, copy bandwidth), then per row ``start`` and ``done`` (its benchmark rows)
or ``error``. The orchestrator gives each row its own time box from its ``start`` line and
restarts the worker past a row that overran it, so that one slow or hung row costs only its
own box.

Every row is ours against the peers a user would otherwise pick, forward and
forward+backward (inference and a training step for whole models), bf16, with the memory
floor. ``--mode eager`` (the headline) leaves out the torch.compile'd peers, whose first call
is an Inductor compile of tens of seconds; ``--mode compiled`` (the lease's last step, when
time is left) runs only those, next to the eager peer they are checked against. Each row
also records the first call of every variant (compile and autotuning included) and the
autotuners' choices.

``--rehearse``: the same rows at tiny shapes on the CPU (Triton through its interpreter, the
CUDA kernels through their host simulation), so that CI proves the script before a GPU
window runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from typing import Callable

import torch

from bench.__main__ import (SAM_MODELS, SWIN_MODELS, copy_bandwidth, model_rows, run_case, timm_model_rows)
from bench.cases import (DEPTHWISE_LAYERS, GROUPED_MODULES, REL_POS_SHAPES, Case, attention_cases, conv_cases,
                         cosine_attention_cases, depthwise_cases, fwd_bwd, grouped_conv_cases, rel_pos_cases)


@dataclasses.dataclass(frozen=True)
class Setting:
    device: torch.device
    dtype: torch.dtype
    mode: str  # "eager" or "compiled"
    rehearse: bool
    bandwidth: float  # device-to-device copy, bytes per second: the floor's denominator


@dataclasses.dataclass(frozen=True)
class HeadlineRow:
    title: str
    run: Callable[[Setting], list[dict]]
    box_s: float  # its time box on the GPU (the rehearsal's are wider: the CPU is slower)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_calls(case: Case, device: torch.device) -> dict[str, dict[str, float]]:
    """Milliseconds of each variant's first forward and first forward+backward: Triton's JIT
    compile and autotuning, the CUDA module load, Inductor's compile (None for a variant that
    raised)."""
    seconds = {}
    for name, forward in case.variants.items():
        start = time.perf_counter()
        try:
            with torch.no_grad():
                forward(*case.inputs[0])
            _synchronize(device)
            middle = time.perf_counter()
            fwd_bwd(forward)(*case.inputs[0])
            _synchronize(device)
        except Exception:  # a backend that declines the call: its timing row says why
            seconds[name] = {"fwd": None, "fwd+bwd": None}
            continue
        seconds[name] = {"fwd": (middle - start) * 1e3, "fwd+bwd": (time.perf_counter() - middle) * 1e3}
    return seconds


def _keep(case: Case, mode: str) -> Case:
    """The variants of ``mode``: eager keeps the eager peers and our fused backends (our
    reference backend is the eager peer again); compiled keeps the first (eager) peer, the
    reference of the agreement check, and the compiled ones."""
    names = [n for n in case.variants if n != "ours: reference"]
    wanted = [n for n in names if n not in case.compiled] if mode == "eager" else \
        [names[0]] + [n for n in names if n in case.compiled]
    return dataclasses.replace(case, variants={n: case.variants[n] for n in wanted})


def _case_rows(cases: list[Case], setting: Setting) -> list[dict]:
    rows = []
    for case in cases:
        case = _keep(case, setting.mode)
        first = first_calls(case, setting.device)
        for row in run_case(case, setting.device, setting.bandwidth):
            row["first_call_ms"] = first[row["variant"]][row["direction"]]
            rows.append(row)
    return rows


def _op_row(title: str, build: Callable, gpu_shape: tuple, tiny_shape: tuple, box_s: float) -> HeadlineRow:
    """A row of one op: ``build`` (a bench.cases builder) at one shape, tiny when rehearsing."""
    def run(s: Setting) -> list[dict]:
        cases = build([tiny_shape if s.rehearse else gpu_shape], s.dtype, s.device)
        if s.rehearse:  # Triton's interpreter takes minutes over NCHW planes (a program per plane)
            cases = [c for c in cases if c.layout != "nchw"]
        return _case_rows(cases, s)
    return HeadlineRow(title, run, box_s)


def _swin_t(s: Setting) -> list[dict]:
    return timm_model_rows(s.device, SWIN_MODELS["tiny" if s.rehearse else "quick"][:1], modes=(s.mode,))


def _sam_b(s: Setting) -> list[dict]:
    """Timm's encoder against it swapped onto Triton. The CUDA backend's rel_pos runs on its
    CUDA-core fallback kernels (NOTES v0.12: about 0.3 s per global block's fwd+bwd); a
    training step of them would take most of the row's time box, and the sam-global row
    measures them already."""
    return timm_model_rows(s.device, SAM_MODELS["tiny" if s.rehearse else "quick"], ["triton"], modes=(s.mode,))


def _ultron_s(s: Setting) -> list[dict]:
    config, batch, size = ("ultron_tiny", 2, 64) if s.rehearse else ("ultron_s", 32, 224)
    return model_rows(s.device, config, batch, size, modes=(s.mode,))


# (B, H, W, heads, D, window): Swin-T's stage-1 and stage-3 attention, at the shapes of the
# peer measurements (shared/measurements) and of bench/NOTES.md's counts; tiny for the CPU.
ATTN_S1, ATTN_S3, ATTN_TINY = (32, 56, 56, 4, 32, 7), (64, 14, 14, 16, 32, 7), (2, 14, 14, 2, 16, 7)
MIXNET_S1 = GROUPED_MODULES["quick"][0]
INCEPTION = GROUPED_MODULES["quick"][2]
TINY_MODULES = {"mixnet": ("MixNet-S mixed dw s1", "mixnet_s", "mixed-s1", 2, 32),
                "inception": GROUPED_MODULES["tiny"][1]}


# In order of value: the lease runs them in this order, each in its own time box.
ROWS = {
    "attn-s1": _op_row("window attention, Swin-T stage 1: B32 56x56 h4 d32 w7",
                       attention_cases, ATTN_S1, ATTN_TINY, 40),
    "attn-s3": _op_row("window attention, Swin-T stage 3: B64 14x14 h16 d32 w7",
                       attention_cases, ATTN_S3, ATTN_TINY, 40),
    "sam-global": _op_row("SAM-B global attention with the decomposed relative position: B4 64x64 h12 d64",
                          rel_pos_cases, REL_POS_SHAPES["quick"][0], REL_POS_SHAPES["tiny"][0], 60),
    "cos-s1": _op_row("cosine window attention (Swin V2) at the stage-1 shape",
                      cosine_attention_cases, ATTN_S1, ATTN_TINY, 40),
    "cos-s3": _op_row("cosine window attention (Swin V2) at the stage-3 shape",
                      cosine_attention_cases, ATTN_S3, ATTN_TINY, 40),
    "mixnet-s1": _op_row("grouped dw conv, MixNet-S first stride-1 mixed layer (B128 C480 14x14, 3/5/7)",
                         grouped_conv_cases, MIXNET_S1, TINY_MODULES["mixnet"], 50),
    "inception-t": _op_row("grouped dw conv, InceptionNeXt-T stage-1 mixer (B128 C96 56x56)",
                           grouped_conv_cases, INCEPTION, TINY_MODULES["inception"], 50),
    "dw-replk31": _op_row("depthwise conv, RepLKNet-31B stage 1 (B64 C128 56x56 31x31)",
                          depthwise_cases, DEPTHWISE_LAYERS["quick"][2], DEPTHWISE_LAYERS["tiny"][2], 50),
    "dilated": _op_row("channel-wise dilated conv, B32 C96 56x56 k3 d1/3/6",
                       conv_cases, (32, 96, 56, 56), (2, 12, 16, 16), 40),
    "swin-t": HeadlineRow("Swin-T B64 224 whole model: eager vs swapped", _swin_t, 90),
    "ultron-s": HeadlineRow("ULTRON-S B32 224 whole model: reference vs kernels", _ultron_s, 90),
    "sam-b": HeadlineRow("SAM-B image encoder B4 1024x1024 whole model: timm vs swapped", _sam_b, 90),
}


def autotune_choices() -> dict[str, dict[str, str]]:
    """What the autotuners chose so far, per kernel and tuning key (for the next session's
    order of preference)."""
    from ultron_kernels.triton.launch import autotuned_kernels

    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in autotuned_kernels().items() if getattr(tuner, "cache", None)}


def emit(event: str, **fields) -> None:
    print("LEASE " + json.dumps(dict(event=event, **fields), default=str), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lease", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help=f"comma-separated row ids, of {', '.join(ROWS)} (default: all)")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager",
                   help="eager: the headline (no torch.compile'd peers); compiled: only those")
    p.add_argument("--rehearse", action="store_true", help="tiny shapes on the CPU (interpreter, simulation)")
    args = p.parse_args(argv)
    ids = list(ROWS) if args.rows == "all" else [i for i in args.rows.split(",") if i]
    unknown = [i for i in ids if i not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    gpu = torch.cuda.is_available() and not args.rehearse
    device = torch.device("cuda" if gpu else "cpu")
    import triton

    setting = Setting(device, torch.bfloat16, args.mode, not gpu, copy_bandwidth(device))
    # The CPU runs the interpreter and the simulation: its boxes are wider. A compiled peer's
    # first call is an Inductor compile.
    scale = (8 if setting.rehearse else 1) * (3 if args.mode == "compiled" else 1)
    emit("meta", device=torch.cuda.get_device_name() if gpu else "cpu (rehearsal)", torch=torch.__version__,
         triton=triton.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
         copy_TBps=setting.bandwidth / 1e12,
         rows={i: dict(title=ROWS[i].title, box_s=ROWS[i].box_s * scale) for i in ids})
    for row_id in ids:
        emit("start", row=row_id)
        start = time.perf_counter()
        try:
            rows = ROWS[row_id].run(setting)
        except Exception as exc:  # the row failed; the next one still runs
            emit("error", row=row_id, error=f"{type(exc).__name__}: {exc}"[:2000],
                 traceback=traceback.format_exc()[-4000:], seconds=time.perf_counter() - start)
            continue
        emit("done", row=row_id, rows=rows, autotune=autotune_choices(), seconds=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
