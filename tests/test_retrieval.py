"""ultron.retrieval and `python -m ultron evaluate`: the revisited Oxford/Paris protocol
against hand-computed cases, GLDv2's mAP@100, exact search (against brute force in float64,
chunked against unchunked, ties, FAISS when installed), multi-scale extraction, and the
command end to end on a small dataset made here in the standard layout."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from ultron import retrieval
from ultron.data import MEAN, STD

GND = [  # database of 6 images; query 0 ranks them 2, 0, 3, 1, 4, 5
    {"easy": [0], "hard": [1], "junk": [2]},
    {"easy": [], "hard": [3], "junk": []},      # no easy positive: out of the Easy mean
    {"easy": [4], "hard": [], "junk": []},      # its positives under Hard would be none: out of it
]
RANKS = np.array([[2, 0, 3, 1, 4, 5], [3, 0, 1, 2, 4, 5], [0, 1, 2, 3, 5, 4]])


def test_revisited_protocols_by_hand():
    r = retrieval.revisited_map(RANKS, GND)
    # Query 0. Easy: positive 0, junk 2 and 1 removed -> the positive is first: AP 1, mP@k 1.
    # Medium: positives 0, 1; junk 2 removed -> ranks 0 and 2: AP (1 + 1)/2/2 + (1/2 + 2/3)/2/2;
    # mP@1 = 1, mP@5 = mP@10 = 2/3 (the reference's min(k, last positive rank) denominator).
    # Hard: positive 1, junk 2 and 0 removed -> rank 1: AP (0/1 + 1/2)/2 = 1/4; mP@1 0, mP@5 1/2.
    # Query 1: hard 3 at rank 0: AP 1 (Medium, Hard). Query 2: easy 4 at rank 5 (Easy, Medium):
    # AP (0/5 + 1/6)/2; mP@1 = mP@5 = 0, mP@10 = 1/6.
    medium_q0 = 0.5 + (0.5 + 2 / 3) / 4
    q2 = (0 / 5 + 1 / 6) / 2
    assert r["easy"]["queries"] == 2 and r["medium"]["queries"] == 3 and r["hard"]["queries"] == 2
    assert r["easy"]["map"] == pytest.approx((1.0 + q2) / 2)
    assert r["medium"]["map"] == pytest.approx((medium_q0 + 1.0 + q2) / 3)
    assert r["hard"]["map"] == pytest.approx((0.25 + 1.0) / 2)
    assert r["easy"]["mp@k"] == pytest.approx({1: (1 + 0) / 2, 5: (1 + 0) / 2, 10: (1 + 1 / 6) / 2})
    assert r["medium"]["mp@k"][5] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["hard"]["mp@k"] == pytest.approx({1: (0 + 1) / 2, 5: (0.5 + 1) / 2, 10: (0.5 + 1) / 2})
    assert all(0 <= v <= 1 for p in r.values() for v in [p["map"], *p["mp@k"].values()])


def test_a_query_whose_positives_are_all_junk_or_unranked():
    """Positives listed as junk too are removed with the junk (revisitop's order: a junk image
    at a positive's own rank does not move it); positives missing from a truncated ranking
    count as never retrieved."""
    ap, (p1,) = retrieval.average_precision_and_precisions(np.array([5, 6, 7]), [9], [], (1,))
    assert ap == 0.0 and p1 == 0.0
    ap, _ = retrieval.average_precision_and_precisions(np.array([3, 1, 2]), [1, 8], [3], (1,))
    assert ap == pytest.approx(0.5)  # 1 first once 3 is removed; 8 never retrieved: 1 of 2
    ap, _ = retrieval.average_precision_and_precisions(np.array([5, 0, 1]), [0], [5, 0], (1,))
    assert ap == 1.0  # 0 is positive and junk: junk 5 before it is removed, 0 itself stays
    r = retrieval.revisited_map(np.array([[0, 1]]), [{"easy": [], "hard": [], "junk": [0, 1]}])
    assert r["easy"]["queries"] == 0 and np.isnan(r["easy"]["map"])


def test_gldv2_map_at_100():
    ranks = np.array([[4, 1, 7, 2], [0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3]])
    solution = [{"relevant": [1, 2], "usage": "Public"},     # hits at 2 and 4: (1/2 + 2/4) / 2
                {"relevant": [9], "usage": "Public"},        # none retrieved: 0
                {"relevant": [3], "usage": "Private"},       # first: 1
                {"relevant": [1], "usage": "Ignored"}]
    result = retrieval.gldv2_map_at_k(ranks, solution)
    assert result == pytest.approx({"public": (0.5 + 0) / 2, "private": 1.0})
    assert retrieval.gldv2_map_at_k(ranks, solution, k=2)["public"] == pytest.approx((0.5 / 2 + 0) / 2)


def test_gldv2_solution_csv(tmp_path):
    path = tmp_path / "solution.csv"
    path.write_text("id,images,Usage\nq1,i2 i3,Public\nq2,None,Ignored\nq3,i1,Private\n")
    solution = retrieval.read_gldv2_solution(str(path), ["q1", "q2", "q3", "q4"], ["i1", "i2", "i3"])
    assert solution == [{"relevant": [1, 2], "usage": "Public"}, {"relevant": [], "usage": "Ignored"},
                        {"relevant": [0], "usage": "Private"}, {"relevant": [], "usage": "Ignored"}]


def _brute_force(q: np.ndarray, db: np.ndarray, k: int):
    scores = q @ db.T
    order = np.lexsort((np.broadcast_to(np.arange(db.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_search_is_exact_chunked_and_breaks_ties_by_index():
    """Integer-valued descriptors: every product is exact in float64 whatever the summation
    order, so the ranking is fully determined, ties (many here) included: the lower index
    first, chunked or not."""
    rng = np.random.default_rng(0)
    q, db = rng.integers(-2, 3, (5, 16)).astype(np.float64), rng.integers(-2, 3, (37, 16)).astype(np.float64)
    db[20] = db[3]
    q[4] = db[3]
    for k in (1, 10, 37):
        want_s, want_i = _brute_force(q, db, k)
        for chunk in (7, 1000):
            s, i = retrieval.search(q, db, k, chunk_size=chunk, query_chunk=2, device="cpu")
            assert np.array_equal(i, want_i) and np.array_equal(s, want_s), (k, chunk)
    _, i = retrieval.search(q, db, 2, chunk_size=7, device="cpu")
    assert i[4].tolist() == [3, 20]
    s, i = retrieval.search(q.astype(np.float32), db.astype(np.float32), 100, device="cpu")
    assert i.shape == (5, 37)  # k larger than the database: all of it, ranked


def test_search_in_float32_chunked_equals_unchunked():
    rng = np.random.default_rng(2)
    q, db = rng.standard_normal((7, 64)).astype(np.float32), rng.standard_normal((300, 64)).astype(np.float32)
    s1, i1 = retrieval.search(q, db, 50, chunk_size=32, device="cpu")
    s2, i2 = retrieval.search(q, db, 50, device="cpu")
    assert np.array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    np.testing.assert_allclose(s2, np.take_along_axis(q.astype(np.float64) @ db.T.astype(np.float64), i2, 1),
                               rtol=1e-5, atol=1e-5)


def test_search_with_faiss_equals_torch():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed: the FAISS engine is not checked here")
    rng = np.random.default_rng(1)
    q, db = rng.standard_normal((9, 32)).astype(np.float32), rng.standard_normal((500, 32)).astype(np.float32)
    s_t, i_t = retrieval.search(q, db, 20, device="cpu")
    s_f, i_f = retrieval.search(q, db, 20, engine="faiss", chunk_size=64)
    assert np.array_equal(i_t, i_f)
    np.testing.assert_allclose(s_t, s_f, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,error,match", [
    (lambda: retrieval.search(np.ones((2, 8)), np.ones((3, 4)), 1), ValueError, "8-dim descriptors but the database has 4"),
    (lambda: retrieval.search(np.ones((2, 8)), np.ones((0, 8)), 1), ValueError, "database is empty"),
    (lambda: retrieval.search(np.full((2, 8), np.nan), np.ones((3, 8)), 1), ValueError, "queries holds NaN"),
    (lambda: retrieval.search(np.ones((2, 8)), np.ones((3, 8)), 0), ValueError, "k must be a positive integer, got 0"),
    (lambda: retrieval.search(np.ones(8), np.ones((3, 8)), 1), ValueError, "queries: expected a 2-D"),
    (lambda: retrieval.search(np.ones((2, 8)), np.ones((3, 8)), 1, engine="annoy"), ValueError, "engine must be"),
    (lambda: retrieval.revisited_map(np.ones((2, 3)), GND[:2]), ValueError, "2-D integer array"),
    (lambda: retrieval.revisited_map(RANKS, GND[:2]), ValueError, "gnd has 2 queries but ranks has 3 rows"),
])
def test_bad_input_is_a_named_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_multiscale_extraction_streams_to_a_memmap(tmp_path):
    """Each scale's descriptor normalised, averaged, normalised again; rows in the loader's
    order; images of different sizes in one batch run as sub-batches of equal size."""
    import ultron

    torch.manual_seed(0)
    model = ultron.build("ultron_tiny", num_classes=3)
    images = [torch.randn(3, 64, 64), torch.randn(3, 96, 64), torch.randn(3, 64, 64)]
    loader = torch.utils.data.DataLoader(images, batch_size=3, collate_fn=list)
    out = tmp_path / "d.npy"
    got = retrieval.extract(model, loader, (1.0, 0.5), out=str(out), progress=False)
    assert np.array_equal(np.load(out), got) and got.shape == (3, 64)
    with torch.no_grad():
        for image, row in zip(images, got):
            ds = [torch.nn.functional.normalize(model.descriptor(retrieval._resized(image[None], s, 32)), dim=-1)
                  for s in (1.0, 0.5)]
            np.testing.assert_allclose(row, torch.nn.functional.normalize(ds[0] + ds[1], dim=-1)[0].numpy(),
                                       rtol=1e-5, atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1)
    with pytest.raises(ValueError, match="scales must be positive"):
        retrieval.extract(model, loader, ())


def _make_revisited(root, name="roxford5k"):
    """A small dataset in the revisited layout: augmented views of scikit-image's photos, each
    photo a landmark; three queries (a box each) with easy, hard and junk images."""
    from PIL import Image

    from ultron.data import SamplePhotos

    photos = SamplePhotos(96, length=12, seed=3)
    folder = os.path.join(root, name, "jpg")
    os.makedirs(folder)
    names = [f"img_{i:02d}" for i in range(15)]
    for i, n in enumerate(names):
        view, _ = photos[i % 12]
        pixels = (view * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy()
        Image.fromarray((pixels * 255).astype(np.uint8)).save(os.path.join(folder, n + ".jpg"))
    gnd = []
    for q in range(3):  # query q is a view of photo q, as database images q and q + 8
        same = [i for i in range(12) if i % photos.num_classes == q]
        gnd.append({"bbx": [4, 4, 90, 90], "easy": same[:1], "hard": same[1:], "junk": [q + 4]})
    with open(os.path.join(root, name, f"gnd_{name}.pkl"), "wb") as f:
        pickle.dump({"imlist": names[:12], "qimlist": names[12:], "gnd": gnd}, f)
    return gnd


def test_evaluate_command_end_to_end(tmp_path, capsys):
    from ultron.__main__ import main

    gnd = _make_revisited(str(tmp_path))
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "roxford5k", "--root", str(tmp_path), "--config", "ultron_tiny",
                 "--image-size", "64", "--scales", "1,0.707", "--backend", "reference", "--device", "cpu",
                 "--out", str(out), "--no-progress", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "config ultron_tiny (random init), backend reference, device cpu" in text and "medium" in text
    record = json.loads((out / "results.json").read_text())
    ranks = np.load(out / "ranks.npy")
    assert ranks.shape == (3, 12)
    expected = json.loads(json.dumps(retrieval.revisited_map(ranks, gnd)))
    assert record["results"] == expected
    assert record["weights"] == "random init" and record["scales"] == [1.0, 0.707]
    assert np.load(out / "database.npy").shape == (12, 64)


def test_evaluate_names_the_layout_when_the_dataset_is_missing(tmp_path, capsys):
    from ultron.__main__ import main

    assert main(["evaluate", "--dataset", "rparis6k", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gnd_rparis6k.pkl" in err and "<root>/<name>/jpg/<image>.jpg" in err and len(err.splitlines()) == 1


def test_evaluate_under_torchrun_shards_the_extraction(tmp_path):
    """Two gloo processes each extract half of the images; the first joins the shards: the
    same descriptors and ranks as one process."""
    import subprocess
    import sys

    from helpers import ROOT

    _make_revisited(str(tmp_path))
    common = ["evaluate", "--dataset", "roxford5k", "--root", str(tmp_path), "--config", "ultron_tiny",
              "--image-size", "64", "--scales", "1", "--backend", "reference", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ultron", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                          "-m", "ultron", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in two.stdout
    for name in ("database.npy", "queries.npy", "ranks.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name), atol=1e-6)
    assert not [f for f in os.listdir(tmp_path / "two") if ".rank" in f]
