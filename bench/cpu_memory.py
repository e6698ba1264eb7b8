"""Peak CPU memory of one forward+backward of a timm SAM attention block: timm's own path
against the same module swapped to our reference backend.

``python -m bench.cpu_memory --variant timm|reference [--grid 48] [--dim 256] [--heads 4]
[--dtype fp32|bf16]`` prints one JSON line: the variant and ``peak_mb``, the process's
resident-set high-water mark (``getrusage``) over its resident set just before the call.
Run one variant per process: a high-water mark only grows, so a second measurement in the
same process would see the first. Linux only (``/proc/self/statm``).

The CPU has no caching allocator with statistics (``peak_mb`` in bench/__main__.py is
GPU-only), so this is how the reference's memory is checked against timm's on a machine
without a GPU (issue #23: the reference path keeps no more than timm does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb(variant: str, grid: int, dim: int, heads: int, dtype: torch.dtype) -> float:
    """fwd+bwd of a global SAM attention over a ``grid`` x ``grid`` input (the whole grid one
    window), parameters drawn at random (the tables start at zero in timm)."""
    import ultron_kernels as uk
    from timm.models import vision_transformer_sam as sam

    torch.manual_seed(0)
    attn = sam.Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(grid, grid))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    if variant == "reference":
        uk.swap_in(attn, "reference")
    attn = attn.to(dtype)
    x = torch.randn(1, grid, grid, dim, dtype=dtype, requires_grad=True)
    before = resident_mb()
    attn(x).sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["timm", "reference"], required=True)
    p.add_argument("--grid", type=int, default=48, help="tokens per side of the global block")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    peak = peak_mb(args.variant, args.grid, args.dim, args.heads, DTYPES[args.dtype])
    print(json.dumps(dict(variant=args.variant, grid=args.grid, dim=args.dim, heads=args.heads,
                          dtype=args.dtype, peak_mb=round(peak, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
