"""The main job (`make demo`): ULTRON on real photos, reference vs kernel backends.

Builds the model (ultron_tiny on a CPU, ultron_s on a GPU), checks whole-model parity
(descriptors, logits, loss, every parameter gradient) of each kernel backend against the
pure-PyTorch path, times inference and a training step on a GPU, and prints a report.
Exits non-zero if parity fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import ultron
from ultron.cli import HelpFormatter
import ultron_kernels as uk
from ultron.data import sample_batch
from ultron.parity import compare_backends, failures, training_step


def _time_ms(fn, repeats: int = 10) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=repeats * 25, return_mode="median")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--config", choices=sorted(ultron.CONFIGS), default=None,
                   help="default: ultron_s on a GPU, ultron_tiny on the CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on a GPU, 2 on the CPU")
    p.add_argument("--backend", choices=("all", "triton", "cuda"), default="all",
                   help="the kernel backend(s) compared with the reference")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ultron demo", description=__doc__,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m ultron demo: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print(f"python -m ultron demo: error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    name = args.config or ("ultron_s" if gpu else "ultron_tiny")
    batch = args.batch_size or (8 if gpu else 2)
    torch.manual_seed(0)
    model = ultron.build(name, backend="reference", num_classes=8, layer_scale_init=0.5).to(device)
    size = ultron.CONFIGS[name]["image_size"]
    images, labels, _ = sample_batch(batch, size)
    images, labels = images.to(device), labels.to(device)
    status = uk.available_backends(device)
    print(f"ULTRON demo: {name}, batch {batch} of {size}x{size} scikit-image photos on {device}")
    print("backends: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
    wanted = ("triton", "cuda") if args.backend == "all" else (args.backend,)
    backends = [b for b in wanted if status[b] == "available"]
    if not gpu:
        print("note: timings need a GPU; on the CPU the Triton kernels run through Triton's "
              "interpreter and the CUDA kernels through the host simulation, to check parity only.")
    ok = bool(backends)
    if not backends:
        print("no kernel backend can run here: nothing to compare (see the reasons above)")
    modes = ["float32"] + (["bf16-autocast"] if gpu else [])
    rows = []
    for backend in backends:
        for mode in modes:
            dtype = torch.bfloat16 if mode == "bf16-autocast" else None
            result = compare_backends(model, backend, images, labels, dtype)
            bad = failures(result, mode)
            ok &= not bad
            rows.append((backend, mode, result, bad))
    print(f"\n{'backend':8} {'mode':14} {'descriptor':>10} {'logits':>9} {'loss':>9} "
          f"{'worst grad':>10}  verdict")
    for backend, mode, r, bad in rows:
        if "error" in r:
            print(f"{backend:8} {mode:14} FAIL: {r['error']}")
            continue
        print(f"{backend:8} {mode:14} {r['descriptor']:10.2e} {r['logits']:9.2e} {r['loss']:9.2e} "
              f"{r['grad']:10.2e}  {'ok' if not bad else 'FAIL ' + '; '.join(bad)}"
              f"  ({r['grad_name']})")
    if gpu:
        print(f"\ntimings (median ms, bf16 autocast, batch {batch}):")
        base = None
        for backend in ["reference"] + backends:
            uk.swap_in(model, backend)
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                infer = _time_ms(lambda: model.descriptor(images))
            model.train()
            step = _time_ms(lambda: training_step(model, images, labels, torch.bfloat16))
            base = base or (infer, step)
            print(f"  {backend:9} inference {infer:8.2f}  ({base[0] / infer:4.2f}x)   "
                  f"train step {step:8.2f}  ({base[1] / step:4.2f}x)")
        uk.swap_in(model, "reference")
    print("\nparity: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
