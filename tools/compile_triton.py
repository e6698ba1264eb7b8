"""Compile the Triton kernels of ultron_kernels for a GPU target, without a GPU.

Triton lowers a kernel to PTX and runs its bundled ptxas with no device present, so this
checks on any machine what the interpreter cannot: that every kernel compiles for the chip
(dot shapes, layouts, shared memory within the limit), and whether the loads that should be
16 bytes wide are. Prints one line per case and, with --json, a JSON list.

Must run with TRITON_INTERPRET unset (it needs real @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/compile_triton.py: unset TRITON_INTERPRET (it needs compiled kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ultron_kernels.triton import dilated_conv as conv  # noqa: E402
from ultron_kernels.triton import window_attention as attn  # noqa: E402

HOPPER_SHARED_LIMIT = 232448  # bytes per block (opt-in) on sm_90
FLOAT_POINTERS = {"lse_ptr", "dbias_ptr", "bias_ptr", "dw_partial_ptr", "db_partial_ptr"}
INT_POINTERS = {"dil_ptr"}


def _case(name, fn, element, constexprs, num_warps=4, num_stages=3, ones=(), divisible=(),
          overrides=None):
    """Signature from the kernel's own argument names: pointers of ``element`` type unless
    listed, ints i32, ``ones`` specialised to the constant 1 (as Triton does for an int
    argument equal to 1 at launch), ``divisible`` marked as multiples of 16."""
    overrides = overrides or {}
    names = list(fn.arg_names)
    signature, constants = {}, dict(constexprs)
    for n in names:
        if n in constants:
            signature[n] = "constexpr"
        elif n in ones:
            signature[n], constants[n] = "constexpr", 1
        elif n.endswith("_ptr"):
            default = "*fp32" if n in FLOAT_POINTERS else "*i32" if n in INT_POINTERS else f"*{element}"
            signature[n] = overrides.get(n, default)
        elif n == "scale":
            signature[n] = "fp32"
        else:
            signature[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if signature[n] != "constexpr" and (n.endswith("_ptr") or n in divisible)}
    return dict(name=name, fn=fn, signature=signature, constexprs=constants, attrs=attrs,
                num_warps=num_warps, num_stages=num_stages)


def cases():
    tile_nhwc = dict(BLOCK_C=32, BLOCK_H=4, BLOCK_W=8)
    tile_nchw = dict(BLOCK_C=2, BLOCK_H=8, BLOCK_W=32)
    conv_strides = ("C", "ssb", "ssh", "ssw", "sdb", "sdh", "sdw")
    for element in ("bf16", "fp32"):
        for k in (3, 7):
            yield _case(f"conv fwd nhwc {element} k{k} uniform-dilation", conv._dilated_conv_gather_kernel,
                        element, dict(K=k, STRIDE=1, HAS_BIAS=True, TRANSPOSED=False, CHANNEL_RUN=32,
                                      **tile_nhwc), ones=("ssc", "sdc"), divisible=conv_strides)
        yield _case(f"conv fwd nhwc {element} per-channel-dilation", conv._dilated_conv_gather_kernel,
                    element, dict(K=3, STRIDE=2, HAS_BIAS=True, TRANSPOSED=False, CHANNEL_RUN=1,
                                  **tile_nhwc), ones=("ssc", "sdc"), divisible=conv_strides)
        yield _case(f"conv grad-input nchw {element}", conv._dilated_conv_gather_kernel, element,
                    dict(K=3, STRIDE=2, HAS_BIAS=False, TRANSPOSED=True, CHANNEL_RUN=32, **tile_nchw),
                    ones=("ssw", "sdw"))
        for k, layout in ((3, torch.channels_last), (5, torch.contiguous_format)):
            taps = triton.next_power_of_2(k * k)
            sample = torch.empty(1, 96, 8, 8).to(memory_format=layout)
            tile = conv._grad_weight_tile(sample, taps, 32)
            warps = tile.pop("num_warps")
            ones = ("sdyc", "sxc") if layout == torch.channels_last else ("sdyw", "sxw")
            yield _case(f"conv grad-weight {'nhwc' if ones[0] == 'sdyc' else 'nchw'} {element} k{k}",
                        conv._dilated_conv_grad_weight_kernel, element,
                        dict(K=k, STRIDE=1, CHANNEL_RUN=32, TAPS=taps, **tile), num_warps=warps,
                        ones=ones, divisible=("C", "sdyb", "sdyh", "sdyw", "sxb", "sxh", "sxw"))
        variants = [(d, window, 1) for d in (32, 128) for window in ((7, 7), (16, 16))]
        variants += [(32, (7, 7), 0), (32, (4, 6), 2)]  # no bias; dense bias, rectangular
        for d, window, bias_kind in variants:
            tokens = window[0] * window[1]
            block = attn._block(tokens)
            common = dict(WH=window[0], WW=window[1], SH=window[0] // 2, SW=window[1] // 2, D=d,
                          BIAS_KIND=bias_kind, BLOCK=block, NUM_BLOCKS=triton.cdiv(tokens, block),
                          DOT_FP32=False, PRECISION="ieee" if element == "fp32" else "tf32")
            strides = [n for n in attn._window_attn_bwd_kernel.arg_names
                       if n.startswith("s") and n != "scale" and not n.startswith("sbias")]
            tag = f"{element} d{d} window{window[0]}x{window[1]}"
            tag += "" if bias_kind == 1 else f" bias{bias_kind}"
            yield _case(f"attention fwd {tag}",
                        attn._window_attn_fwd_kernel, element, common,
                        divisible=strides, **attn.launch_config(d, False))
            dq = "*fp32" if common["NUM_BLOCKS"] > 1 else f"*{element}"
            yield _case(f"attention bwd {tag}",
                        attn._window_attn_bwd_kernel, element, dict(common, BIAS_GRAD=True),
                        overrides={"dq_ptr": dq}, divisible=strides,
                        **attn.launch_config(d, True))


def compile_case(case, arch: int) -> dict:
    src = ASTSource(fn=case["fn"], signature=case["signature"], constexprs=case["constexprs"],
                    attrs=case["attrs"])
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    ptx = kernel.asm["ptx"]
    return dict(name=case["name"], shared_bytes=kernel.metadata.shared,
                # 16-byte global reads: vector loads, or asynchronous copies into shared
                # memory (what the software pipeliner turns a loop's loads into).
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))
                + len(re.findall(r"cp\.async(?:\.\w+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(?:16|0x10)\b", ptx)),
                scalar_loads=len(re.findall(r"ld\.global(?:\.(?!v[24])\w+)*\s", ptx)),
                mma=len(re.findall(r"\b(?:mma|wgmma)\.", ptx)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    results, failed = [], 0
    for case in cases():
        try:
            r = compile_case(case, args.arch)
            r["ok"] = r["shared_bytes"] <= HOPPER_SHARED_LIMIT
        except Exception as exc:  # report every failing case, not just the first
            r = dict(name=case["name"], ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
        failed += not r["ok"]
        results.append(r)
        print(("ok   " if r["ok"] else "FAIL ") + json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{len(results) - failed} compiled for sm_{args.arch}, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
