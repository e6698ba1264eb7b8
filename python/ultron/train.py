"""`python -m ultron train`: AdamW + cosine schedule, bf16 autocast on a GPU, checkpoints,
DistributedDataParallel under torchrun (nccl on GPUs, gloo on CPUs)."""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import ultron
from ultron.data import ImageFolderViews, SamplePhotos


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ultron train", description=__doc__)
    p.add_argument("--config", default="ultron_tiny", choices=sorted(ultron.CONFIGS))
    p.add_argument("--backend", default="auto", choices=ultron.BACKENDS)
    p.add_argument("--data", default=None, help="ImageFolder directory (default: bundled sample photos)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _setup_distributed():
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


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = _setup_distributed()
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
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    step = load_checkpoint(checkpoint, model, optimizer, scheduler) if args.resume else 0
    train_model = DistributedDataParallel(model) if world > 1 else model
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
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
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, labels in loader:
            if step >= args.steps:
                break
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
        epoch += 1
    if progress is not None:
        progress.close()
    identical = True
    if world > 1:  # DDP must keep every rank's weights the same: check it, bit for bit
        flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(gathered[0], g) for g in gathered[1:])
        dist.destroy_process_group()
    if log is not None:
        log.close()
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(dict(steps=step, world_size=world, parameters_identical_across_ranks=identical), f)
    return 0 if identical else 1
