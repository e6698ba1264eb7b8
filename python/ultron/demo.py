"""The main job (`make demo`): ULTRON on real photos, reference vs kernel backends.

Builds the model (ultron_tiny on a CPU, ultron_s on a GPU), checks whole-model parity
(descriptors, logits, loss, every parameter gradient) of each kernel backend against the
pure-PyTorch path, times inference and a training step on a GPU, and prints a report.
Exits non-zero if parity fails.
"""

from __future__ import annotations

import sys
import time

import torch

import ultron
import ultron_kernels as uk
from ultron.data import sample_batch
from ultron.parity import compare_backends, failures, training_step


def _time_ms(fn, repeats: int = 10) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=repeats * 25, return_mode="median")


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    name, batch = ("ultron_s", 8) if gpu else ("ultron_tiny", 2)
    torch.manual_seed(0)
    model = ultron.build(name, backend="reference", num_classes=8, layer_scale_init=0.5).to(device)
    size = ultron.CONFIGS[name]["image_size"]
    images, labels, _ = sample_batch(batch, size)
    images, labels = images.to(device), labels.to(device)
    status = uk.available_backends(device)
    print(f"ULTRON demo: {name}, batch {batch} of {size}x{size} scikit-image photos on {device}")
    print("backends: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
    backends = [b for b in ("triton", "cuda") if status[b] == "available"]
    if not gpu:
        print("note: timings need a GPU; on this CPU machine the Triton kernels run through the "
              "interpreter (TRITON_INTERPRET=1) to check parity only.")
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
