"""`python -m ultron train`: AdamW + cosine schedule, bf16 autocast on a GPU, checkpoints,
DistributedDataParallel under torchrun (nccl on GPUs, gloo on CPUs)."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import ultron
from ultron.cli import HelpFormatter
from ultron.data import ImageFolderViews, SamplePhotos


class TrainSetupError(Exception):
    """A problem with the run's arguments or files, found before training starts: reported
    as one line by the CLI."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="ultron_tiny", choices=sorted(ultron.CONFIGS), help="model size")
    p.add_argument("--backend", default="auto", choices=ultron.BACKENDS, help="kernel backend")
    p.add_argument("--data", default=None, help="ImageFolder directory (default: bundled sample photos)")
    p.add_argument("--image-size", type=int, default=None, help="default: the config's")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps, then cosine")
    p.add_argument("--out", default="runs/train", help="run directory: checkpoint.pt, log.jsonl, summary.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    group.add_argument("--overwrite", action="store_true", help="start afresh in an existing OUT")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--seed", type=int, default=0, help="model, order and augmentation seed")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ultron train", description=__doc__,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def setup_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def load_checkpoint(path: str, model, optimizer, scheduler) -> int:
    """Loads all or nothing: a corrupt or mismatched checkpoint raises before any state is
    changed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise RuntimeError(f"checkpoint {path} cannot be read ({exc})") from exc
    missing = {"model", "optimizer", "scheduler", "step"} - set(state)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {sorted(missing)}")
    own = model.state_dict()
    theirs = state["model"]
    if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
        diff = sorted(set(own) ^ set(theirs)) or [k for k in own if own[k].shape != theirs[k].shape]
        raise RuntimeError(f"checkpoint {path} does not match this model (first differences: {diff[:5]})")
    model.load_state_dict(theirs)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


RUN_FILES = ("checkpoint.pt", "log.jsonl", "summary.json")


def _prepare_run_directory(args, rank: int, world: int) -> str:
    """The checkpoint path. A run never mixes with an earlier one by accident: an existing
    run needs --resume (continue it) or --overwrite (start again). Every rank checks before
    any rank writes (so they all agree), then rank 0 clears the directory."""
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume:
        if not os.path.exists(checkpoint):
            raise TrainSetupError(f"--resume: no checkpoint at {checkpoint}")
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get("config")
        if saved != args.config:
            raise TrainSetupError(f"--resume: {checkpoint} holds a {saved!r} run, not --config {args.config}")
    elif existing and not args.overwrite:
        raise TrainSetupError(f"{args.out} already holds a run ({', '.join(existing)}); "
                              "pass --resume to continue it or --overwrite to start again")
    if world > 1:
        dist.barrier()
    if rank == 0:
        if args.overwrite:
            for name in existing:
                os.remove(os.path.join(args.out, name))
        os.makedirs(args.out, exist_ok=True)
    return checkpoint


def _check_batches(dataset, sampler, batch_size: int, world: int) -> None:
    """drop_last loaders yield nothing from a shard smaller than the batch: say so now."""
    shard = len(sampler) if sampler is not None else len(dataset)
    if shard < batch_size:
        raise TrainSetupError(
            f"the dataset has {len(dataset)} images, {shard} per process over {world} process(es): "
            f"fewer than --batch-size {batch_size}, so no full batch can be formed; lower "
            "--batch-size or add images")


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    try:
        return _train(args)
    except TrainSetupError as exc:
        print(f"python -m ultron train: error: {exc}", file=sys.stderr)
        return 2


def _train(args) -> int:
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed)
    size = args.image_size or ultron.CONFIGS[args.config]["image_size"]
    dataset = (ImageFolderViews(args.data, size, args.seed) if args.data
               else SamplePhotos(size, length=max(64, args.batch_size * world * 8), seed=args.seed))
    model = ultron.build(args.config, backend=args.backend, num_classes=dataset.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    _check_batches(dataset, sampler, args.batch_size, world)
    checkpoint = _prepare_run_directory(args, rank, world)
    if args.resume:
        try:
            step = load_checkpoint(checkpoint, model, optimizer, scheduler)
        except RuntimeError as exc:
            raise TrainSetupError(str(exc)) from exc
    else:
        step = 0
    if rank == 0:
        from ultron_kernels.backends import auto_backend

        backend = args.backend if args.backend != "auto" else f"auto -> {auto_backend(device)}"
        print(f"train: config {args.config}, backend {backend}, device {device} x {world} process(es), "
              f"data {args.data or 'the sample photos'} ({len(dataset)} images, {dataset.num_classes} classes), "
              f"image size {size}, batch {args.batch_size} per process, steps {step}..{args.steps}")
    train_model = DistributedDataParallel(model) if world > 1 else model
    loader = DataLoader(dataset, args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=True)
    use_bf16 = device.type == "cuda"
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    epoch = 0
    model.train()
    while step < args.steps:
        # New views and a new order every pass.
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = 0
        for images, labels in loader:
            if step >= args.steps:
                break
            batches += 1
            start = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                _, logits = train_model(images, labels)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if rank == 0:
                record = dict(step=step, loss=loss.item(), lr=scheduler.get_last_lr()[0],
                              images_per_s=args.batch_size * world / seconds)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{record['images_per_s']:.0f}")
                if step % args.save_every == 0 or step == args.steps:
                    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                    scheduler=scheduler.state_dict(), step=step,
                                    config=args.config), checkpoint + ".tmp")
                    os.replace(checkpoint + ".tmp", checkpoint)  # never a half-written checkpoint
        if batches == 0 and step < args.steps:  # never spin without progress
            raise RuntimeError(f"epoch {epoch} yielded no batch ({len(loader)} per epoch)")
        epoch += 1
    if progress is not None:
        progress.close()
    identical = True
    if world > 1:  # DDP must keep every rank's weights the same: check it, bit for bit
        flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(gathered[0], g) for g in gathered[1:])
        # Tear down only once every rank is done communicating, and after DDP (whose reducer
        # holds the group) is gone: a rank that closed its gloo connections while its peer
        # still used them was seen to abort ("terminate called without an active exception").
        # The last step's graph (loss, logits) still references DDP's hooks: drop it too, and
        # collect, so the reducer and its hold on the group are gone before the group is.
        train_model = loss = logits = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    if log is not None:
        log.close()
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(dict(steps=step, world_size=world, parameters_identical_across_ranks=identical), f)
        print(f"checkpoint: {checkpoint}\nlog: {os.path.join(args.out, 'log.jsonl')}")
    return 0 if identical else 1
