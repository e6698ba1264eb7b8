"""Compile the Triton kernels of ultron_kernels for sm_80, sm_86, sm_89 and sm_90, without a GPU,
exactly as the JIT would on each.

For each architecture a stand-in Triton driver reports that GPU's capability and shared
memory limit (tools/gpu_archs.py), and the package's own launchers plan their launches on CPU
tensors (ultron_kernels/triton/launch.py): the configuration a GPU of that kind would run is
chosen by the same code, compiled through ``kernel.warmup`` (the JIT's own specialisation),
and never launched. Every configuration the autotuners can pick is compiled too, and the
autotuners' pruning is checked against the compiled sizes.

Per launch it reports: the chosen configuration and the preferred ones rejected (with the
shared memory each needed), shared memory, registers and local memory (cuobjdump
--dump-resource-usage on the cubin, with the copy bundled in Triton's wheel), resident blocks
per SM (tools/occupancy.cpp), 16-byte loads and tensor-core instructions (PTX).

usage: python tools/compile_triton.py [--arch 86 ...] [--json out.json] [--jobs 2]
Must run with TRITON_INTERPRET unset; uses a fresh Triton cache (nothing carried across runs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import itertools
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/compile_triton.py: unset TRITON_INTERPRET (it needs compiled kernels)")
os.environ["ULTRON_KERNELS_AUTOTUNE"] = "0"   # plan the plain launches; autotune configs below

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from gpu_archs import ARCHS, occupancy  # noqa: E402

DTYPES = ("bf16", "fp16", "fp32")


def _install_driver(arch) -> None:
    """A Triton CUDA driver for a GPU that is not there: capability and limits of ``arch``."""
    import triton
    from triton.backends.nvidia.driver import CudaDriver

    class StandInUtils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": arch.shared_optin, "multiprocessor_count": 1,
                    "max_num_regs": 65536, "warpSize": 32}

    class StandInDriver(CudaDriver):
        def __init__(self):  # no libcuda: only what compiling needs
            self.utils = StandInUtils()
            self.launcher_cls = None
            self.get_device_capability = lambda device=None: arch.capability
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None
            self.get_current_stream = lambda device=None: 0

        @staticmethod
        def is_active():
            return True

    triton.runtime.driver.set_active(StandInDriver())


def _attention_cases():
    """(name, launch) for the forward and backward of each attention variant."""
    import torch
    from ultron_kernels.triton import window_attention as attn

    # Head dims 32/64/128 with Swin's 7x7 windows, windows over 64 tokens (16x16 and Swin V2's
    # 24x24 at 384 span several blocks: the dq kernel too; a larger window changes only a loop
    # count), no bias, a dense bias on a rectangular window; Swin V2's cosine attention
    # (qk_norm, a per-head scale and pad vectors with their gradients, timm's order). fp32
    # tiles are twice bf16's and set the limits; fp16 tiles have bf16's sizes, one variant
    # checks that it compiles.
    bf16 = [(32, (7, 7), 1, False), (64, (7, 7), 1, False), (128, (7, 7), 1, False),
            (128, (16, 16), 1, False), (32, (7, 7), 0, False), (32, (4, 6), 2, False),
            (32, (8, 8), 1, True), (32, (24, 24), 1, True)]
    fp32 = [(32, (7, 7), 1, False), (128, (7, 7), 1, False), (128, (16, 16), 1, False),
            (128, (8, 8), 1, True)]
    for dtype_name, dtype, variants in (("bf16", torch.bfloat16, bf16),
                                        ("fp16", torch.float16, [(64, (7, 7), 1, False)]),
                                        ("fp32", torch.float32, fp32)):
        for d, window, bias_kind, cosine in variants:
            heads, tokens = 2, window[0] * window[1]
            q, k, v = (torch.empty(1, 2 * window[0], 2 * window[1], heads, d, dtype=dtype) for _ in range(3))
            bias = (torch.empty((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=dtype) if bias_kind == 1
                    else torch.empty(heads, tokens, tokens, dtype=dtype) if bias_kind == 2 else None)
            shift = (window[0] // 2, window[1] // 2)
            tag = f"{dtype_name} d{d} window{window[0]}x{window[1]}" + ("" if bias_kind == 1 else f" bias{bias_kind}")
            variant = attn.Variant(0.125)
            if cosine:
                tag += " cosine"
                pad = torch.empty(heads, d, dtype=dtype)
                variant = attn.Variant(torch.empty(heads), qk_norm=True, k_pad=pad, v_pad=pad, roll_first=True)
            launch, out, lse, = attn.forward_launch(q, k, v, bias, bias_kind, window, shift, variant)
            yield f"attention fwd {tag}", launch
            # As the op runs it: the forward's output given where no scale gradient or cosine
            # attention needs the softmax term summed from the tiles (the pre-pass then runs).
            yield from _backward_launches(tag, attn.backward_launch(
                out, q, k, v, lse, bias, bias_kind, window, shift, variant, bias_grad=bias_kind != 0,
                scale_grad=cosine, pad_grad=cosine, out=None if cosine else out)[0])
    # SAM / ViTDet's decomposed relative position (each query's table products gathered; their
    # gradient summed per key row and column by one-hot dots): SAM's global block over its
    # 64 x 64 grid and its 14 x 14 windows with pad vectors, in bf16 (SAM's training dtype)
    # and fp32, at SAM-B/L's head dim 64, at 128, and at SAM-H's 80 (its global block: 128-wide
    # tiles, the padding columns masked; its windows compile as D = 128's).
    for dtype_name, dtype, d, window, padded in (("bf16", torch.bfloat16, 64, (64, 64), False),
                                                 ("bf16", torch.bfloat16, 64, (14, 14), True),
                                                 ("bf16", torch.bfloat16, 128, (14, 14), False),
                                                 ("fp32", torch.float32, 64, (64, 64), False),
                                                 ("bf16", torch.bfloat16, 80, (64, 64), False)):
        heads = 2
        q, k, v = (torch.empty(1, *window, heads, d, dtype=dtype) for _ in range(3))
        rows = torch.empty(1, *window, heads, 2 * window[0] - 1 + 2 * window[1] - 1)
        pad = torch.empty(heads, d, dtype=dtype) if padded else None
        variant = attn.Variant(0.125, k_pad=pad, v_pad=pad, rel_rows=rows)
        tag = f"{dtype_name} d{d} window{window[0]}x{window[1]} relpos" + (" pad" if padded else "")
        launch, out, lse, = attn.forward_launch(q, k, v, None, 0, window, (0, 0), variant)
        yield f"attention fwd {tag}", launch
        yield from _backward_launches(tag, attn.backward_launch(
            out, q, k, v, lse, None, 0, window, (0, 0), variant, bias_grad=False, pad_grad=padded, out=out)[0])


def _backward_launches(tag: str, launches: list):
    """(name, launch) of each backward kernel: windows of several blocks run the dq kernel
    first (after the softmax-term pre-pass, when it runs), then the dk/dv kernel."""
    from ultron_kernels.triton import window_attention as attn

    names = {attn._softmax_term_kernel: "bwd-delta", attn._window_attn_bwd_dq_kernel: "bwd-dq",
             attn._window_attn_bwd_kernel: "bwd"}
    for launch in launches:
        yield f"attention {names[launch.kernel]} {tag}", launch


def _conv_cases():
    import torch

    from ultron_kernels.ops.grouped_depthwise_conv import DepthwiseGroup as G
    from ultron_kernels.ops.grouped_depthwise_conv import resolve_groups
    from ultron_kernels.triton import grouped_depthwise_conv as conv

    # The kernels read every group's shape at run time, so one mix of kernel shapes covers
    # them: channel counts that are multiples of 32 (full blocks, channels_last vector loads)
    # or not (the last block of a group masked).
    mixes = {"full": [G(32, 3), G(32, 5, padding="tf_same"), G(32, (1, 11))],
             "ragged": [G(30, 3), G(34, 5, padding="tf_same"), G(32, (1, 11))]}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for layout_name, layout in (("nhwc", torch.channels_last), ("nchw", torch.contiguous_format)):
            for mix in (("full", "ragged") if layout_name == "nhwc" else ("full",)):
                x = torch.empty(2, 96, 17, 19, dtype=dtype).to(memory_format=layout)
                tag = f"{layout_name} {dtype_name} {mix}"
                for stride in (1, 2):
                    groups = resolve_groups(mixes[mix], 17, 19, stride)
                    spec = tuple(v for g in groups for v in g)
                    weight = torch.empty(sum(g.channels * g.kernel_h * g.kernel_w for g in groups), dtype=dtype)
                    out = torch.empty(2, 96, *groups[0].output_size(17, 19, stride), dtype=dtype)
                    out = out.to(memory_format=layout)
                    yield f"conv fwd {tag} s{stride}", conv.gather_launch(x, weight, weight[:96], spec, out,
                                                                          stride, transposed=False)
                # The backward kernels at stride 2 (the stride is a compile-time constant;
                # stride 1 differs only by the checks it removes).
                yield f"conv grad-input {tag} s2", conv.gather_launch(out, weight, None, spec, x, 2, transposed=True)
                yield f"conv grad-weight {tag} s2", conv.grad_weight_launch(out, x, weight.numel(), spec, 2)[0]
    # The banded tensor-core kernels (large kernels, 16-bit, stride 1): RepLKNet's 31x31 over
    # full channel blocks (32-wide tiles), a ragged mix of a 13x13 and a dilated 13x9 (the
    # latter's span needs 32-wide tiles), and UniRepLKNet's 13x13 on a 14x14 image (16 x 16
    # tiles).
    band_mixes = {"full": ([G(96, 31, padding="same")], 40, 44),
                  "ragged": ([G(30, 13, padding="same"), G(66, (13, 9), dilation=(1, 3), padding="same")], 40, 44),
                  "13x13": ([G(96, 13, padding="same")], 14, 14)}
    for layout_name, layout in (("nhwc", torch.channels_last), ("nchw", torch.contiguous_format)):
        for mix in (("full", "ragged", "13x13") if layout_name == "nhwc" else ("full", "13x13")):
            mix_groups, height, width = band_mixes[mix]
            groups = resolve_groups(mix_groups, height, width, 1)
            spec = tuple(v for g in groups for v in g)
            assert conv.takes_band_path(spec, 1, torch.bfloat16)
            x = torch.empty(2, 96, height, width, dtype=torch.bfloat16).to(memory_format=layout)
            weight = torch.empty(sum(g.channels * g.kernel_h * g.kernel_w for g in groups), dtype=torch.bfloat16)
            tag = f"{layout_name} bf16 {mix}"
            yield f"conv band fwd {tag}", conv.band_launch(x, weight, weight[:96], spec, torch.empty_like(x), False)
            yield f"conv band grad-input {tag}", conv.band_launch(x, weight, None, spec, torch.empty_like(x), True)
            yield f"conv band grad-weight {tag}", conv.band_grad_weight_launch(x, x, weight.numel(), spec)[0]


def _autotune_cases():
    """(name, autotuner, launch of its base kernel): per autotuned kernel, the launch whose
    configurations need the most shared memory: attention at head_dim 128 in bf16 and fp32,
    when the plan keeps the preferred tile (a smaller tile is launched plain, untuned); the
    conv gather once per layout, bf16 (its tiles need a few KB of shared memory at most, the
    same for every kernel shape; fp32 doubles it, still far below any limit)."""
    from ultron_kernels.triton import grouped_depthwise_conv as conv
    from ultron_kernels.triton import window_attention as attn

    for name, launch in _attention_cases():
        if name in ("attention fwd bf16 d128 window7x7", "attention fwd fp32 d128 window7x7"):
            if launch.meta["BLOCK"] == attn._block(7 * 7):
                yield name, attn._window_attn_fwd_autotuned, launch
    for name, launch in _conv_cases():
        if name == "conv fwd nhwc bf16 full s2":
            yield name, conv._gather_autotuned["nhwc"], launch
        if name == "conv fwd nchw bf16 full s2":
            yield name, conv._gather_autotuned["nchw"], launch


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    return dict(registers=int(found[1]), stack_bytes=int(found[2]), local_bytes=int(found[4]))


def _describe(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return dict(shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                num_stages=compiled.metadata.num_stages, **_resource_usage(compiled.asm["cubin"]),
                # 16-byte global reads: vector loads, or asynchronous copies into shared
                # memory (what the software pipeliner turns a loop's loads into).
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))
                + len(re.findall(r"cp\.async(?:\.\w+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(?:16|0x10)\b", ptx)),
                mma=len(re.findall(r"\b(?:mma|wgmma)\.", ptx)))


def _config_name(meta: dict) -> str:
    keys = ("BLOCK", "BLOCK_C", "BLOCK_H", "BLOCK_W", "num_warps", "num_stages")
    return " ".join(f"{k}={meta[k]}" for k in keys if k in meta)


def compile_arch(sm: int) -> list[dict]:
    """Every planned launch and every autotuning configuration, compiled for ``sm``."""
    arch = ARCHS[sm]
    _install_driver(arch)
    results = []
    cases = itertools.chain(_attention_cases(), _conv_cases())
    start = time.perf_counter()
    for name, launch in cases:  # planning a launch compiles its candidates
        r = dict(name=name, arch=sm, kind="launch", limit=arch.shared_optin)
        try:
            r.update(config=_config_name(launch.meta), **_describe(launch.compile()),
                     rejected=[f"{_config_name(c)}: {shared} B" for c, shared in launch.rejected])
        except Exception as exc:  # report every failing case, not just the first
            r["error"] = f"{type(exc).__name__}: {exc}"[:400]
        r["seconds"] = round(time.perf_counter() - start, 2)
        results.append(r)
        start = time.perf_counter()
    for name, tuner, launch in _autotune_cases():
        # The autotuner's own pruning call, with the keywords a launch passes it.
        tuner.nargs = dict(zip(tuner.arg_names, launch.args))
        kept = tuner.prune_configs(dict(launch.meta, grid=launch.grid, warmup=False))
        for config in tuner.configs:
            meta = dict(launch.meta, **config.all_kwargs())
            r = dict(name=f"{name} [autotune {_config_name(meta)}]", arch=sm, kind="autotune",
                     limit=arch.shared_optin, config=_config_name(meta), pruned=config not in kept)
            start = time.perf_counter()
            try:
                grid = launch.grid(meta) if callable(launch.grid) else launch.grid
                r.update(_describe(tuner.fn.warmup(*launch.args, grid=grid, **meta)))
            except Exception as exc:
                r["error"] = f"{type(exc).__name__}: {exc}"[:400]
            r["seconds"] = round(time.perf_counter() - start, 2)
            results.append(r)
    return results


def _check(r: dict) -> bool:
    if "error" in r:
        return False
    fits = r["shared_bytes"] <= r["limit"]
    # A launch must fit; an autotuning config is fine either way as long as the pruning
    # drops exactly those that do not fit.
    return fits if r["kind"] == "launch" else fits != r["pruned"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                   help="architecture(s) to compile for (default: all of tools/gpu_archs.py)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--jobs", type=int, default=2, help="architectures compiled in parallel")
    args = p.parse_args(argv)
    archs = args.arch or sorted(ARCHS)
    with tempfile.TemporaryDirectory() as tmp:
        if len(archs) == 1:
            os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tmp, "cache"))
            results = compile_arch(archs[0])
        else:
            # One process per architecture: Triton's in-memory kernel cache is keyed by device
            # index, not by target, so a second architecture in one process would get the
            # first one's kernels.
            def run(sm):
                out = os.path.join(tmp, f"sm_{sm}.json")
                env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, f"cache_{sm}"))
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--arch", str(sm),
                                       "--json", out], env=env, capture_output=True, text=True)
                if not os.path.exists(out):
                    return [dict(name=f"sm_{sm}", arch=sm, kind="launch", limit=0,
                                 error=(proc.stdout + proc.stderr)[-2000:])]
                with open(out) as f:
                    return json.load(f)

            with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                results = [r for per_arch in pool.map(run, archs) for r in per_arch]
    ok = [r for r in results if r.get("error") is None]
    blocks = occupancy([(r["arch"], r["registers"], r["num_warps"] * 32, r["shared_bytes"], 0) for r in ok])
    for r, b in zip(ok, blocks):
        r["blocks_per_sm"] = b
    failed = 0
    for r in results:
        r["ok"] = _check(r)
        failed += not r["ok"]
        print(("ok   " if r["ok"] else "FAIL ") + json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{len(results) - failed} of {len(results)} compiled within the limits of "
          f"{', '.join(f'sm_{a}' for a in archs)}; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
