"""`python -m bench`: time our backends and the peers side by side, with the memory floor.

Writes results.json, results.md and PNG plots (with matplotlib, the ``[bench]`` extra) under
bench/results/<device>/<UTC time>/, a new folder per run (and copies them to --out / $OUT).
Without a GPU it runs the tiny preset on the CPU to exercise the harness and says so: those
timings are CPU timings of the reference path, Triton's interpreter and the CUDA simulation,
and say nothing about the kernels' GPU speed (no speedups or floor fractions are computed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import sys
import time

from typing import Optional

import torch

from bench.cases import (ATTN_SHAPES, CONV_SHAPES, DEPTHWISE_LAYERS, GROUPED_MODULES, REL_POS_SHAPES, Case,
                         attention_cases, conv_cases, cosine_attention_cases, depthwise_cases, fwd_bwd,
                         grouped_conv_cases, rel_pos_cases, rotate)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # On the CPU only the harness is checked (the fused backends there are Triton's interpreter
    # and the CUDA simulation): one call is enough.
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_mb(fn, device: torch.device):
    """Memory one call of ``fn`` allocates at its peak beyond what was allocated before (MB):
    what a variant needs for itself, its saved activations included. None on the CPU, where
    the caching allocator's statistics do not exist."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (the floor's denominator)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def agreement(case: Case) -> dict[str, float]:
    """Relative error of each variant's forward against the first variant's (the eager
    reference), on the first input set: a peer or backend that computes something else must
    not be timed as if it were the same op. Variants whose output is laid out differently
    (SDPA and FlexAttention keep the windows partitioned) are not compared."""
    errors, first = {}, None
    with torch.no_grad():
        for name, forward in case.variants.items():
            try:
                out = forward(*case.inputs[0]).double()
            except Exception:  # reported by the timing below
                continue
            if first is None:
                first = out
            elif out.shape == first.shape:
                errors[name] = ((out - first).norm() / first.norm().clamp_min(1e-30)).item()
    return errors


def run_case(case: Case, device: torch.device, bandwidth: float) -> list[dict]:
    gpu = device.type == "cuda"
    rows = []
    errors = agreement(case)
    for direction, floor_bytes in (("fwd", case.floor_bytes_fwd), ("fwd+bwd", case.floor_bytes_fwd_bwd)):
        floor_ms = floor_bytes / bandwidth * 1e3
        for name, forward in case.variants.items():
            fn = forward if direction == "fwd" else fwd_bwd(forward)
            row = dict(op=case.op, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""),
                       layout=case.layout, direction=direction, variant=name, floor_ms=floor_ms,
                       rel_err_vs_eager=errors.get(name))
            try:
                if direction == "fwd":
                    with torch.no_grad():
                        ms = time_ms(rotate(case.inputs, fn), device)
                        peak = peak_mb(rotate(case.inputs, fn), device)
                else:
                    ms = time_ms(rotate(case.inputs, fn), device)
                    peak = peak_mb(rotate(case.inputs, fn), device)
                row.update(ms=ms, floor_fraction=floor_ms / ms if gpu else None, peak_mb=peak)
            except Exception as exc:  # a peer the installed torch cannot run: say why
                row.update(ms=None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            rows.append(row)
    add_speedups(rows, device)
    return rows


def add_speedups(rows: list[dict], device: torch.device) -> None:
    """Speedup of each variant over the fastest peer of the same direction (the rows given
    share one shape and layout). None on the CPU: interpreter and simulation times are noise."""
    if device.type != "cuda":
        for r in rows:
            r["speedup_vs_best_peer"] = None
        return
    for direction in {r["direction"] for r in rows}:
        group = [r for r in rows if r["direction"] == direction and r["ms"] is not None]
        peers = [r["ms"] for r in group if r["variant"].startswith("peer")]
        for r in group:
            r["speedup_vs_best_peer"] = min(peers) / r["ms"] if peers else None


MODES = ("eager", "compiled")


def model_rows(device: torch.device, config: str = "ultron_s", batch: int = 32, size: int = 224,
               backends: Optional[list[str]] = None, modes: tuple = MODES,
               directions: tuple = ("inference", "train step")) -> list[dict]:
    """The reference ULTRON model: inference (descriptors) and a training step, on the
    reference backend (the peer) and swapped to each fused backend (``backends``; default:
    every available one); ``modes``: eagerly, and compiled (on a GPU only). bf16 autocast on a
    GPU, fp32 on the CPU. Each row also gives images per second."""
    import ultron
    import ultron_kernels as uk
    from ultron.data import sample_batch
    from ultron.parity import training_step

    gpu = device.type == "cuda"
    autocast = torch.bfloat16 if gpu else None
    images, labels, classes = sample_batch(batch, size)
    images, labels = images.to(device), labels.to(device)
    model = ultron.build(config, num_classes=classes).to(device)
    fused = backends or [b for b, why in uk.available_backends(device).items()
                         if why == "available" and b != "reference"]
    variants = []
    if "eager" in modes:
        variants += [("peer: eager (reference)", "reference", False)] + [(f"ours: {b}", b, False) for b in fused]
    if "compiled" in modes and gpu:
        variants += [("peer: torch.compile(reference)", "reference", True)]
        variants += [(f"ours: {b} + torch.compile", b, True) for b in fused]
    shape = f"B{batch} {size}x{size}"
    dtype = "bf16-autocast" if gpu else "fp32"
    rows = []
    for name, backend, compile_it in variants:
        uk.swap_in(model, backend)
        runner = torch.compile(model) if compile_it else model
        describe = torch.compile(model.descriptor) if compile_it else model.descriptor
        for direction in directions:
            try:
                if direction == "inference":
                    def fn():
                        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                            return describe(images)
                else:
                    def fn():
                        return training_step(runner, images, labels, autocast)
                ms = time_ms(fn, device)
                rows.append(dict(op=config, shape=shape, dtype=dtype, layout="-", direction=direction,
                                 variant=name, ms=ms, images_per_s=batch / (ms * 1e-3)))
            except Exception as exc:
                rows.append(dict(op=config, shape=shape, dtype=dtype, layout="-", direction=direction,
                                 variant=name, ms=None,
                                 note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    uk.swap_in(model, "reference")
    add_speedups(rows, device)
    return rows


# Retrieval descriptor extraction (python -m ultron evaluate's inner loop): (config, batch, size).
EXTRACTION = {"quick": ("ultron_s", 16, 512), "tiny": ("ultron_tiny", 2, 64)}


# Whole models: (timm name, or "module:callable" for another library's builder; keyword
# arguments; batch; image size, or (T, H, W) for a clip). Swin: the window attention (Video
# Swin: 3D windows); the convnets: the grouped depthwise convolution (MixNet, InceptionNeXt).
SWIN_MODELS = {
    "quick": [("swin_tiny_patch4_window7_224", {}, 64, 224), ("swinv2_tiny_window8_256", {}, 64, 256),
              ("torchvision.models.video:swin3d_t", dict(num_classes=400), 8, (16, 224, 224))],
    "tiny": [("swin_tiny_patch4_window7_224",
              dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(1, 2), num_classes=10), 2, 56)],
}
VIDEO_SWIN_TINY = ("torchvision.models.video.swin_transformer:SwinTransformer3d",
                   dict(patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[1, 2],
                        window_size=[4, 4, 4], num_classes=10, stochastic_depth_prob=0.0), 1, (4, 16, 16))
CONVNET_MODELS = {
    # (timm name, create_model kwargs, batch, size[, swap_in options]): the plain depthwise
    # CNNs swap their depthwise convs in (opt-in, see swap_in) and run channels_last, as they
    # are trained (channels_last: True is the bench's own option, not swap_in's).
    "quick": [("mixnet_s", {}, 128, 224), ("inception_next_tiny", {}, 128, 224),
              ("convnext_tiny", {}, 128, 224, dict(depthwise=True, channels_last=True)),
              ("efficientnet_b0", {}, 128, 224, dict(depthwise=True, channels_last=True))],
    "tiny": [("inception_next_atto", dict(num_classes=10), 2, 32, dict(depthwise=True, channels_last=True))],
}
# Segment Anything's image encoder (timm's samvit: 14 x 14 windows and four global blocks over
# the 64 x 64 grid of a 1024-pixel image), with a pooled classifier head so that a training
# step has a loss; tiny: one windowed and one global block on a padded 5 x 5 grid.
SAM_MODELS = {
    "quick": [("samvit_base_patch16", dict(num_classes=10, global_pool="avg"), 4, 1024)],
    "tiny": [("samvit_base_patch16", dict(img_size=80, embed_dim=32, depth=2, num_heads=2, window_size=4,
                                          global_attn_indexes=(1,), neck_chans=16, num_classes=10,
                                          global_pool="avg"), 1, 80)],
}


def create_model(name: str, kwargs: dict) -> torch.nn.Module:
    """A timm model by name, or "module:callable" (e.g. torchvision.models.video:swin3d_t)."""
    if ":" not in name:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    module, builder = name.split(":")
    return getattr(importlib.import_module(module), builder)(**kwargs)


def timm_model_rows(device: torch.device, models: list, backends: Optional[list[str]] = None,
                    modes: tuple = MODES) -> list[dict]:
    """Inference and a training step of whole models (timm's, or torchvision's by builder;
    create_model): as they are (the peers) and swapped in to
    each fused backend (``backends``; default: every available one); ``modes``: eagerly, and
    compiled (on a GPU only: on the CPU they would time Inductor's compile). bf16 autocast on a
    GPU, fp32 on the CPU. Each variant's logits are compared with the first variant's (eager,
    or compiled when only compiled runs: rel. err column)."""
    import ultron_kernels as uk

    gpu = device.type == "cuda"
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=gpu)
    fused = backends or [b for b, why in uk.available_backends(device).items()
                         if why == "available" and b != "reference"]
    rows = []
    for name, kwargs, batch, size, *options in models:
        swap_options = dict(options[0]) if options else {}
        layout = torch.channels_last if swap_options.pop("channels_last", False) else torch.contiguous_format
        torch.manual_seed(0)
        model = create_model(name, kwargs).to(device, memory_format=layout)
        frames = size if isinstance(size, tuple) else (size, size)
        images = torch.randn(batch, 3, *frames, device=device).contiguous(memory_format=layout)
        classes = getattr(model, "num_classes", None) or kwargs["num_classes"]
        labels = torch.randint(0, classes, (batch,), device=device)
        # Every variant starts from the same state: a training step updates the batch-norm
        # statistics, which would change the next variant's logits.
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        variants = []
        if "eager" in modes:
            variants += [("peer: eager", None, False)] + [(f"ours: {b}", b, False) for b in fused]
        if "compiled" in modes and gpu:
            variants += [("peer: torch.compile", None, True)]
            variants += [(f"ours: {b} + torch.compile", b, True) for b in fused]
        eager_logits, per_model = None, []
        for variant, backend, compile_it in variants:
            uk.swap_out(model)
            model.load_state_dict(initial)
            swapped = len(uk.swap_in(model, backend, **swap_options).swapped) if backend else 0
            runner = torch.compile(model) if compile_it else model

            def infer():
                model.eval()
                with torch.no_grad(), torch.autocast(**autocast):
                    return runner(images)

            def train_step():
                model.train()
                model.zero_grad(set_to_none=True)
                with torch.autocast(**autocast):
                    loss = torch.nn.functional.cross_entropy(runner(images).float(), labels)
                loss.backward()

            logits = infer().float()
            eager_logits = logits if eager_logits is None else eager_logits
            err = ((logits - eager_logits).norm() / eager_logits.norm()).item()
            for direction, fn in (("inference", infer), ("train step", train_step)):
                row = dict(op=name, shape=f"B{batch} {'x'.join(map(str, frames))}",
                           dtype="bf16-autocast" if gpu else "fp32",
                           layout="nhwc" if layout == torch.channels_last else "-", direction=direction,
                           variant=variant, rel_err_vs_eager=err,
                           note=f"{swapped} modules swapped" if backend else "")
                try:
                    row.update(ms=time_ms(fn, device), peak_mb=peak_mb(fn, device))
                except Exception as exc:
                    row.update(ms=None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                per_model.append(row)
        uk.swap_out(model)
        add_speedups(per_model, device)
        rows += per_model
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Benchmark results: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
             f"copy bandwidth {meta['copy_TBps']:.2f} TB/s, {meta['timestamp']}", ""]
    if meta.get("caveat"):
        lines += [f"**{meta['caveat']}**", ""]
    lines += [
             "| op | shape | dtype | layout | dir | variant | ms | floor ms | floor fraction | vs best peer "
             "| peak MB | rel. err vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.4f}" if r.get("ms") is not None else f"skipped ({r.get('note', '')})"
        floor = f"{r['floor_ms']:.4f}" if r.get("floor_ms") is not None else "-"
        frac = f"{r['floor_fraction']:.2f}" if r.get("floor_fraction") is not None else "-"
        speed = f"{r['speedup_vs_best_peer']:.2f}x" if r.get("speedup_vs_best_peer") else "-"
        err = f"{r['rel_err_vs_eager']:.1e}" if r.get("rel_err_vs_eager") is not None else "-"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['layout']} | {r['direction']} "
                     f"| {r['variant']} | {ms} | {floor} | {frac} | {speed} | {peak} | {err} |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out_dir: str) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib, or the [bench] extra); "
              "results.json and results.md are written")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ours = [r for r in rows if r["variant"].startswith("ours") and r.get("speedup_vs_best_peer")]
    for key, label, name in (("speedup_vs_best_peer", "speedup over the best peer (x)", "speedup.png"),
                             ("floor_fraction", "fraction of the memory floor", "floor_fraction.png")):
        data = [r for r in ours if r.get(key) is not None]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(11, 0.32 * len(data) + 1.5))
        labels = [f"{r['op'][:12]} {r['shape']} {r['layout']} {r['direction']} [{r['variant'][6:]}]"
                  for r in data]
        ax.barh(range(len(data)), [r[key] for r in data], color="tab:blue")
        ax.set_yticks(range(len(data)), labels, fontsize=7)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def save(rows: list[dict], meta: dict, out_dir: str, copy_to: str | None, with_plots: bool) -> None:
    """results.json and results.md (and the plots) under out_dir, copied to copy_to."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows, meta))
    written = plots(rows, out_dir) if with_plots else []
    if copy_to:
        os.makedirs(copy_to, exist_ok=True)
        for name in ["results.json", "results.md"] + [os.path.basename(w) for w in written]:
            shutil.copy(os.path.join(out_dir, name), copy_to)


CPU_CAVEAT = ("CPU run: these times are of the reference path, Triton's interpreter and the CUDA "
              "host simulation on the CPU. They check the harness and say nothing about GPU speed; "
              "no speedups or floor fractions are computed.")


def run_folder(meta: dict) -> str:
    """bench/results/<device>/<UTC time>/: a new folder per run, so no run overwrites another."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in meta["device"]).strip("_")[:40]
    stamp = meta["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    folder = os.path.join(os.path.dirname(__file__), "results", slug, stamp)
    suffix = 1
    while os.path.exists(folder + (f"-{suffix}" if suffix > 1 else "")):
        suffix += 1
    return folder + (f"-{suffix}" if suffix > 1 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--op", choices=["conv", "grouped", "depthwise", "attention", "rel_pos", "model", "extraction", "swin", "convnets",
                                    "sam", "all"],
                   default="all", help="what to time: conv (channel-wise dilated conv), grouped (timm's "
                   "grouped depthwise modules), depthwise (single depthwise layers vs F.conv2d), attention "
                   "(plain and cosine window attention), rel_pos (SAM's global attention with the decomposed "
                   "relative position, with peak memory), model "
                   "(ULTRON-S, GPU), extraction (ULTRON-S retrieval descriptors at 512x512, images/s), "
                   "swin / convnets / sam (whole timm models: Swin, the depthwise CNNs, SAM-B's image "
                   "encoder at 1024x1024), all (default)")
    p.add_argument("--preset", choices=["quick", "tiny"], default="quick",
                   help="quick: the real model shapes (GPU; default); tiny: small shapes that check the "
                   "harness in seconds (what a machine without a GPU always runs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="dtype of every shape of the preset")
    p.add_argument("--also-dtypes", default="fp16,fp32",
                   help="comma-separated dtypes run on the first shape of each op only (GPU)")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="also copy the results to this folder (default: $OUT when set); every run "
                   "writes its own bench/results/<device>/<UTC time>/ in any case")
    args = p.parse_args(argv)
    unknown = [n for n in args.also_dtypes.split(",") if n and n not in DTYPES]
    if unknown:
        p.error(f"--also-dtypes: unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    preset = args.preset if gpu else "tiny"
    dtype = DTYPES[args.dtype] if gpu else torch.float32
    if not gpu:
        print("No GPU here: running the tiny preset on the CPU (reference path and CPU peers) to "
              "check the harness. These are CPU timings; kernel speed needs a GPU.")
    import triton

    bandwidth = copy_bandwidth(device)
    meta = dict(device=torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or 'unknown'})",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                copy_TBps=bandwidth / 1e12, preset=preset, dtype=str(dtype),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if not gpu:
        meta["caveat"] = CPU_CAVEAT
    out_dir = run_folder(meta)
    meta["folder"] = os.path.relpath(out_dir, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = []
    builders = []  # (builder, its shape table)
    if args.op in ("conv", "all"):
        builders.append((conv_cases, CONV_SHAPES))
    if args.op in ("grouped", "all"):
        builders.append((grouped_conv_cases, GROUPED_MODULES))
    if args.op in ("depthwise", "all"):
        builders.append((depthwise_cases, DEPTHWISE_LAYERS))
    if args.op in ("attention", "all"):
        builders += [(attention_cases, ATTN_SHAPES), (cosine_attention_cases, ATTN_SHAPES)]
    if args.op in ("rel_pos", "all"):
        builders.append((rel_pos_cases, REL_POS_SHAPES))
    also = [DTYPES[name] for name in args.also_dtypes.split(",") if name] if gpu else []
    for case_dtype, count in [(dtype, None)] + [(d, 1) for d in also if d != dtype]:
        for build, table in builders:
            for case in build(table[preset][:count], case_dtype, device):
                rows += run_case(case, device, bandwidth)
                save(rows, meta, out_dir, args.out, with_plots=False)  # a timeout keeps these
                print(f"done: {case.op} {case.shape} {case.dtype} {case.layout}", flush=True)
    if args.op in ("model", "all") and gpu:
        rows += model_rows(device)
    if args.op in ("extraction", "all"):
        rows += model_rows(device, *EXTRACTION[preset], directions=("inference",))
    if args.op in ("swin", "all"):
        rows += timm_model_rows(device, SWIN_MODELS[preset])
    if args.op in ("convnets", "all"):
        rows += timm_model_rows(device, CONVNET_MODELS[preset])
    if args.op in ("sam", "all"):
        rows += timm_model_rows(device, SAM_MODELS[preset])
    save(rows, meta, out_dir, args.out, with_plots=True)
    print(markdown([r for r in rows if r.get("ms") is not None], meta)[-6000:])
    print(f"results in {os.path.relpath(out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
