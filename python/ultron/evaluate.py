"""Retrieval evaluation of an ULTRON checkpoint (or a random init) on revisited Oxford or
Paris: multi-scale descriptors of the database and of the cropped queries, exact search over
the whole database, and the Easy / Medium / Hard mAP and mP@1/5/10 table. Writes
results.json, the descriptors (database.npy, queries.npy) and ranks.npy to --out. Datasets are
read from their standard layout, never downloaded:
<root>/<name>/gnd_<name>.pkl and <root>/<name>/jpg/<image>.jpg.
Under torchrun every process extracts its contiguous shard of the images (as training
shards its batches); the first one joins the shards, searches and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import ultron
from ultron.cli import HelpFormatter

DATASETS = ("roxford5k", "rparis6k")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="revisited benchmark")
    p.add_argument("--root", required=True, help="folder holding <dataset>/ in the standard layout")
    p.add_argument("--checkpoint", default=None, help="a `python -m ultron train` checkpoint.pt "
                   "(default: a random init, said so on the console and in results.json)")
    p.add_argument("--config", default="ultron_s", choices=sorted(ultron.CONFIGS),
                   help="model size when there is no checkpoint (a checkpoint names its own)")
    p.add_argument("--scales", default="0.707,1,1.414", help="comma-separated image scales")
    p.add_argument("--image-size", type=int, default=1024, help="longer side of every image at scale 1")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (grouped by size)")
    p.add_argument("--backend", default="auto", choices=ultron.BACKENDS, help="kernel backend")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (the same model in every process)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default="runs/evaluate", help="folder for results.json and the descriptors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model(args, device):
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        model = ultron.build(args.config, backend=args.backend, num_classes=1)
        return model.to(device), args.config, "random init"
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise SystemExit(f"python -m ultron evaluate: error: --checkpoint {args.checkpoint}: {exc}")
    config = state.get("config", args.config)
    weights = state["model"] if "model" in state else state
    model = ultron.build(config, backend=args.backend, num_classes=weights["classifier.weight"].shape[0])
    model.load_state_dict(weights)
    return model.to(device), config, args.checkpoint


def run(args) -> int:
    import numpy as np
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from ultron_kernels.backends import auto_backend
    from ultron import retrieval
    from ultron.train import setup_distributed

    try:
        scales = tuple(float(s) for s in args.scales.split(",") if s)
    except ValueError:
        print(f"python -m ultron evaluate: error: --scales: numbers separated by commas, got {args.scales!r}",
              file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        data = retrieval.load_revisited(args.root, args.dataset)
        database = retrieval.RevisitedImages(args.root, args.dataset, data["imlist"], args.image_size)
        queries = retrieval.RevisitedImages(args.root, args.dataset, data["qimlist"], args.image_size,
                                            boxes=[g["bbx"] for g in data["gnd"]])
    except FileNotFoundError as exc:
        print(f"python -m ultron evaluate: error: {exc}", file=sys.stderr)
        return 2
    rank, world, distributed_device = setup_distributed()
    if args.device is None:
        device = distributed_device
    model, config, weights = _model(args, device)
    backend = args.backend if args.backend != "auto" else f"auto -> {auto_backend(device)}"
    if rank == 0:
        print(f"evaluate: {args.dataset} ({len(database)} images, {len(queries)} queries), config {config} "
              f"({weights}), backend {backend}, device {device} x {world} process(es), scales {scales}, "
              f"image size {args.image_size}")
    os.makedirs(args.out, exist_ok=True)
    descriptors = {}
    for name, dataset in (("database", database), ("queries", queries)):
        shard = np.array_split(np.arange(len(dataset)), world)[rank]
        path = os.path.join(args.out, f"{name}.npy" if world == 1 else f"{name}.rank{rank}.npy")
        loader = DataLoader(Subset(dataset, shard.tolist()), args.batch_size, num_workers=args.workers,
                            collate_fn=list)
        descriptors[name] = retrieval.extract(model, loader, scales, out=path, device=device,
                                              progress=rank == 0 and not args.no_progress, desc=name)
    if world > 1:
        dist.barrier()  # every shard written
        if rank == 0:
            for name in descriptors:
                parts = [np.load(os.path.join(args.out, f"{name}.rank{r}.npy"), mmap_mode="r") for r in range(world)]
                joined = np.lib.format.open_memmap(os.path.join(args.out, f"{name}.npy"), mode="w+",
                                                   dtype=np.float32, shape=(sum(len(p) for p in parts), parts[0].shape[1]))
                start = 0
                for r, part in enumerate(parts):
                    joined[start:start + len(part)] = part
                    start += len(part)
                    os.remove(os.path.join(args.out, f"{name}.rank{r}.npy"))
                joined.flush()
                descriptors[name] = joined
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    _, ranks = retrieval.search(descriptors["queries"], descriptors["database"], len(database), device=device)

    np.save(os.path.join(args.out, "ranks.npy"), ranks)
    results = retrieval.revisited_map(ranks, data["gnd"])
    print(f"\n{'protocol':<9} {'mAP':>7} {'mP@1':>7} {'mP@5':>7} {'mP@10':>7}")
    for protocol, r in results.items():
        print(f"{protocol:<9} " + " ".join(f"{100 * v:7.2f}" for v in [r["map"], *r["mp@k"].values()]))
    record = dict(dataset=args.dataset, config=config, weights=weights, backend=backend, device=str(device),
                  scales=scales, image_size=args.image_size, results=results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nresults: {os.path.join(args.out, 'results.json')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ultron evaluate", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
