"""Image retrieval with ULTRON's global descriptors, as the paper evaluates it.

* :func:`extract`: multi-scale descriptors (each scale's L2-normalised, averaged, normalised
  again: the protocol of the retrieval literature), batched under ``torch.inference_mode``
  (bf16 autocast on a GPU), streamed to a ``.npy`` memmap so that a million descriptors never
  sit in memory at once.
* :func:`search`: exact inner-product top-k, chunked over the database (torch, on the GPU or
  the CPU), or FAISS (``faiss-cpu``, an optional extra) through the same call: equal results
  on its exact index. Equal scores go to the lower database index.
* :func:`revisited_map`: the revisited Oxford / Paris protocol (Easy, Medium, Hard; junk
  removed from the ranking before AP; the reference evaluation's trapezoidal AP and mP@k).
* :func:`gldv2_map_at_k`: Google Landmarks v2 retrieval, mAP@100 on its public and private splits.
* :func:`load_revisited`: ``gnd_<name>.pkl`` of the standard layout (never downloaded).
"""

from __future__ import annotations

import os
import pickle
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SCALES = (0.707, 1.0, 1.414)
# The revisited protocols: (what counts as positive, what is removed from the ranking).
PROTOCOLS = {"easy": (("easy",), ("junk", "hard")),
             "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
REVISITED_LAYOUT = ("<root>/<name>/gnd_<name>.pkl and <root>/<name>/jpg/<image>.jpg "
                    "(the revisited Oxford/Paris layout, e.g. <root>/roxford5k/jpg/all_souls_000000.jpg)")


# ---------------------------------------------------------------- descriptors

def _resized(images: torch.Tensor, scale: float, multiple: int) -> torch.Tensor:
    """``images`` scaled by ``scale``, each side rounded to a multiple of ``multiple`` (the
    model's total stride), at least one multiple."""
    h, w = images.shape[-2:]
    size = [max(multiple, int(round(side * scale / multiple)) * multiple) for side in (h, w)]
    if size == [h, w]:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


def _same_size_groups(batch) -> list[tuple[list[int], torch.Tensor]]:
    """A loader's batch as (positions, stacked images) per image size: a stacked (B, 3, H, W)
    tensor, (images, labels) pairs, or a list of images of different sizes."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and isinstance(batch[0], torch.Tensor) and batch[0].dim() == 4:
        batch = batch[0]  # (images, labels)
    if isinstance(batch, torch.Tensor):
        return [(list(range(batch.shape[0])), batch)]
    groups: dict = {}
    for i, image in enumerate(batch):
        groups.setdefault(tuple(image.shape), []).append(i)
    return [(positions, torch.stack([batch[i] for i in positions])) for positions in groups.values()]


def extract(model, loader: Iterable, scales: Sequence[float] = DEFAULT_SCALES, *, out: Optional[str] = None,
            device: Optional[torch.device] = None, progress: bool = True, desc: str = "extract") -> np.ndarray:
    """Descriptors of every image ``loader`` yields, in order: (N, D) float32, L2-normalised.

    ``loader`` yields stacked (B, 3, H, W) batches, (images, labels) pairs, or lists of
    (3, H, W) images of different sizes (each size runs as one sub-batch). At each of
    ``scales`` the images are resized (sides rounded to the model's stride) and described;
    the per-scale descriptors are L2-normalised, averaged and normalised again. With ``out``
    the result is a ``.npy`` memmap written batch by batch. N is ``len(loader.dataset)``."""
    from ultron.model import TOTAL_STRIDE

    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {scales}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = len(loader.dataset)
    result, row = None, 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="img")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for batch in loader:
                groups = _same_size_groups(batch)
                count = sum(len(positions) for positions, _ in groups)
                described = [None] * count
                for positions, images in groups:
                    images = images.to(device, non_blocking=True)
                    summed = sum(F.normalize(model.descriptor(_resized(images, s, TOTAL_STRIDE)).float(), dim=-1)
                                 for s in scales)
                    for position, d in zip(positions, F.normalize(summed, dim=-1).cpu().numpy()):
                        described[position] = d
                block = np.stack(described)
                if not np.isfinite(block).all():
                    raise ValueError(f"descriptors of images {row}..{row + count - 1} are not finite: "
                                     "the model or its checkpoint produces NaN/inf")
                if result is None:
                    shape = (total, block.shape[1])
                    result = (np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=shape)
                              if out else np.empty(shape, dtype=np.float32))
                if row + count > total:
                    raise ValueError(f"the loader yielded more than len(loader.dataset) = {total} images")
                result[row:row + count] = block
                row += count
                if bar is not None:
                    bar.update(count)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if row != total:
        raise ValueError(f"the loader yielded {row} images, but len(loader.dataset) is {total}")
    if isinstance(result, np.memmap):
        result.flush()
    return result


# ---------------------------------------------------------------- search

def _checked(name: str, descriptors) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(descriptors) if isinstance(descriptors, np.ndarray) else descriptors)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (count, dim) array of descriptors, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: descriptors must be floating point, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: nothing to search {'in' if name == 'database' else 'for'}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf descriptors (rows {torch.nonzero(~torch.isfinite(t).all(1)).flatten()[:5].tolist()}...)")
    return t


def _best(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row: the highest scores, equal scores in ascending database index."""
    order = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def search(queries, database, k: int, *, chunk_size: int = 65536, query_chunk: int = 1024,
           device=None, engine: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over ``database``: (scores, indices), each
    (num_queries, min(k, database size)), best first; equal scores in ascending index.

    ``engine="torch"``: the database in chunks of ``chunk_size`` rows (a memmap is read chunk by
    chunk), on ``device`` (default: CUDA if available), in the descriptors' dtype. ``"faiss"``:
    FAISS's exact inner-product index (``pip install faiss-cpu``), for databases past one
    device's memory; the same results on the same float32 inputs."""
    q, db = _checked("queries", queries), _checked("database", database)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"queries have {q.shape[1]}-dim descriptors but the database has {db.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(int(k), db.shape[0])
    if engine == "faiss":
        return _search_faiss(q, db, k, chunk_size)
    if engine != "torch":
        raise ValueError(f"engine must be 'torch' or 'faiss', got {engine!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.promote_types(q.dtype, db.dtype)
    all_scores, all_indices = [], []
    for q_start in range(0, q.shape[0], query_chunk):
        qc = q[q_start:q_start + query_chunk].to(device, dtype)
        best_s = torch.empty(qc.shape[0], 0, dtype=dtype, device=device)
        best_i = torch.empty(qc.shape[0], 0, dtype=torch.int64, device=device)
        for start in range(0, db.shape[0], chunk_size):
            chunk = db[start:start + chunk_size].to(device, dtype)
            scores = qc @ chunk.T
            indices = torch.arange(start, start + chunk.shape[0], device=device).expand_as(scores)
            best_s, best_i = _best(torch.cat([best_s, scores], 1), torch.cat([best_i, indices], 1), k)
        all_scores.append(best_s.cpu())
        all_indices.append(best_i.cpu())
    return torch.cat(all_scores).numpy(), torch.cat(all_indices).numpy()


def _search_faiss(q: torch.Tensor, db: torch.Tensor, k: int, chunk_size: int):
    try:
        import faiss
    except ImportError:
        raise ImportError("engine='faiss' needs FAISS: pip install faiss-cpu (or "
                          "'ultron_kernels[retrieval]')") from None
    index = faiss.IndexFlatIP(db.shape[1])
    for start in range(0, db.shape[0], chunk_size):
        index.add(np.ascontiguousarray(db[start:start + chunk_size].float().numpy()))
    scores, indices = index.search(np.ascontiguousarray(q.float().numpy()), k)
    return scores, indices.astype(np.int64)


# ---------------------------------------------------------------- metrics

def _positions(ranked: np.ndarray, images) -> np.ndarray:
    return np.flatnonzero(np.isin(ranked, np.asarray(list(images), dtype=np.int64)))


def average_precision_and_precisions(ranked: np.ndarray, positives, junk, kappas: Sequence[int]):
    """One query of the revisited protocol: (AP, [mP@k for k in kappas]) over the ranking
    ``ranked`` (database indices, best first), with the junk images removed from it first.
    AP is the reference evaluation's: trapezoids over recall, a positive at (0-based) rank r
    being the j-th contributing (j/r + (j+1)/(r+1)) / 2 over the number of positives."""
    pos = _positions(ranked, positives)
    junk_at = _positions(ranked, junk)
    pos = pos - np.searchsorted(junk_at, pos, side="left")   # junk ranked before each positive
    if pos.size == 0:
        return 0.0, [0.0] * len(kappas)
    j = np.arange(pos.size)
    before = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
    ap = float(np.sum((before + (j + 1) / (pos + 1)) / 2) / len(positives))
    ranks = pos + 1
    precisions = []
    for kappa in kappas:
        limit = min(int(ranks.max()), kappa)    # the reference evaluation's mP@k
        precisions.append(float((ranks <= limit).sum() / limit))
    return ap, precisions


def revisited_map(ranks, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """The revisited Oxford/Paris evaluation of ``ranks`` ((num_queries, num_ranked) database
    indices, best first) against ``gnd`` (per query: ``easy``, ``hard``, ``junk`` index lists,
    as in ``gnd_roxford5k.pkl``): ``{"easy" | "medium" | "hard": {"map": ..., "mp@k": {k: ...}}}``.
    Easy: easy positive, junk and hard removed; Medium: easy and hard positive, junk removed;
    Hard: hard positive, junk and easy removed. Queries with no positive under a protocol are
    left out of its mean (NaN when none has one)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks: expected a 2-D integer array (num_queries, num_ranked), got "
                         f"{ranks.dtype} of shape {ranks.shape}")
    if len(gnd) != ranks.shape[0]:
        raise ValueError(f"gnd has {len(gnd)} queries but ranks has {ranks.shape[0]} rows")
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be positive, got {kappas}")
    results = {}
    for protocol, (positive_keys, junk_keys) in PROTOCOLS.items():
        aps, precisions = [], []
        for row, entry in zip(ranks, gnd):
            positives = [i for key in positive_keys for i in entry.get(key, [])]
            if not positives:
                continue
            junk = [i for key in junk_keys for i in entry.get(key, [])]
            ap, p = average_precision_and_precisions(row, positives, junk, kappas)
            aps.append(ap)
            precisions.append(p)
        mean_p = np.mean(precisions, 0) if precisions else [float("nan")] * len(kappas)
        results[protocol] = {"map": float(np.mean(aps)) if aps else float("nan"),
                             "mp@k": {k: float(v) for k, v in zip(kappas, mean_p)},
                             "queries": len(aps)}
    return results


def gldv2_map_at_k(ranks, solution: Sequence[dict], k: int = 100) -> dict:
    """Google Landmarks v2 retrieval: mAP@k (100 in the challenge) on the public and private
    splits. ``solution`` per query: ``{"relevant": [database indices], "usage": "Public" |
    "Private" | "Ignored"}`` (:func:`read_gldv2_solution` reads the challenge's CSV). A query's
    AP@k is the sum of precision@i over the relevant images among the first k, over
    min(relevant, k); queries that are Ignored or have nothing relevant are left out."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or len(solution) != ranks.shape[0]:
        raise ValueError(f"ranks ({ranks.shape}) must have one row per solution entry ({len(solution)})")
    per_split: dict = {"public": [], "private": []}
    for row, entry in zip(ranks, solution):
        usage = entry["usage"].lower()
        if usage not in per_split or not entry["relevant"]:
            continue
        relevant = np.isin(row[:k], np.asarray(entry["relevant"], dtype=np.int64))
        hits = np.cumsum(relevant)
        ap = float(np.sum(hits[relevant] / (np.flatnonzero(relevant) + 1)) / min(len(entry["relevant"]), k))
        per_split[usage].append(ap)
    return {split: float(np.mean(aps)) if aps else float("nan") for split, aps in per_split.items()}


def read_gldv2_solution(path: str, query_ids: Sequence[str], index_ids: Sequence[str]) -> list[dict]:
    """The challenge's ``retrieval_solution_v2.1.csv`` (id, images, Usage) as
    :func:`gldv2_map_at_k`'s ``solution``, in the order of ``query_ids``."""
    import csv

    index_of = {name: i for i, name in enumerate(index_ids)}
    rows = {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            images = record["images"].split() if record["images"] not in ("", "None") else []
            rows[record["id"]] = {"relevant": [index_of[i] for i in images if i in index_of],
                                  "usage": record["Usage"]}
    return [rows.get(q, {"relevant": [], "usage": "Ignored"}) for q in query_ids]


# ---------------------------------------------------------------- datasets

def load_revisited(root: str, name: str) -> dict:
    """``gnd_<name>.pkl`` of the revisited layout: {"imlist", "qimlist", "gnd"} (gnd entries
    with ``bbx``, ``easy``, ``hard``, ``junk``). Raises FileNotFoundError naming the layout."""
    path = os.path.join(root, name, f"gnd_{name}.pkl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no {path}; expected {REVISITED_LAYOUT}")
    with open(path, "rb") as f:
        data = pickle.load(f)
    missing = {"imlist", "qimlist", "gnd"} - set(data)
    if missing:
        raise ValueError(f"{path}: not a revisited ground truth (missing {sorted(missing)})")
    return data


class RevisitedImages(torch.utils.data.Dataset):
    """Images of the revisited layout, the longer side resized to ``image_size`` (aspect kept,
    sides rounded to multiples of 32), normalised as in training; queries cropped to their
    ``bbx`` (the standard protocol). Yields (3, H, W) tensors: batch them with ``collate=list``."""

    def __init__(self, root: str, name: str, names: Sequence[str], image_size: int,
                 boxes: Optional[Sequence] = None):
        self.folder = os.path.join(root, name, "jpg")
        self.names, self.image_size, self.boxes = list(names), image_size, boxes
        missing = [n for n in self.names[:1] if not os.path.isfile(self._path(n))]
        if missing:
            raise FileNotFoundError(f"{name}: no {self._path(missing[0])}; expected {REVISITED_LAYOUT}")

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name + ".jpg")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        from ultron.data import MEAN, STD

        image = Image.open(self._path(self.names[index])).convert("RGB")
        if self.boxes is not None:
            image = image.crop(tuple(int(round(v)) for v in self.boxes[index]))
        w, h = image.size
        scale = self.image_size / max(w, h)
        size = tuple(max(32, int(round(side * scale / 32)) * 32) for side in (w, h))
        image = image.resize(size, Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (tensor - MEAN) / STD
