"""tools/gpu_lease.py, the one command a GPU window runs: its time boxes, its restarts past a
row that overruns, its predictions and verdicts, and its files. The whole script is rehearsed
on the CPU by `make gpu-lease REHEARSE=1` in CI (.ci/run); these tests check the parts that a
rehearsal cannot make fail on purpose, with stand-in commands and workers that take seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest

from helpers import ROOT

_spec = importlib.util.spec_from_file_location("gpu_lease", os.path.join(ROOT, "tools", "gpu_lease.py"))
gpu_lease = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_lease)


@pytest.fixture
def lease(tmp_path):
    return gpu_lease.Lease(str(tmp_path), rehearse=True, build=False, budget_s=60)


def test_a_step_over_its_box_is_recorded_and_the_next_runs(lease, monkeypatch):
    monkeypatch.setattr(gpu_lease, "MIN_BOX_S", 1)
    slow = lease.run("slow", [sys.executable, "-c", "import time; print('begun', flush=True); time.sleep(30)"], 1.5)
    assert slow["status"] == "timeout" and slow["seconds"] < 10
    after = lease.run("after", [sys.executable, "-c", "print('fine')"], 10)
    assert after["status"] == "ok" and after["tail"].strip() == "fine"
    failed = lease.run("failing", [sys.executable, "-c", "raise SystemExit(3)"], 10)
    assert failed["status"] == "failed" and failed["rc"] == 3
    log = open(os.path.join(lease.out, "lease.log")).read()
    assert "begun" in log and "== slow: timeout" in log
    saved = json.load(open(os.path.join(lease.out, "results.json")))
    assert [s["status"] for s in saved["steps"]] == ["timeout", "ok", "failed"]
    assert all("output" not in s for s in saved["steps"])  # the output is in lease.log


def test_a_step_with_no_time_left_is_skipped(lease):
    assert lease.run("late", [sys.executable, "-c", "pass"], gpu_lease.MIN_BOX_S - 1)["status"] == "skipped"


# A stand-in for bench/lease.py: the same protocol, rows that pass, hang, fail or crash.
FAKE_WORKER = textwrap.dedent("""
    import json, sys, time
    def emit(**e): print("LEASE " + json.dumps(e), flush=True)
    args = sys.argv[1:]
    rows = args[args.index("--rows") + 1]
    ids = ["fast", "hangs", "raises", "crashes", "last"] if rows == "all" else rows.split(",")
    emit(event="meta", device="stand-in", rows={i: dict(title=i, box_s=2) for i in ids})
    for i in ids:
        emit(event="start", row=i)
        if i == "hangs":
            time.sleep(60)
        if i == "raises":
            emit(event="error", row=i, error="ValueError: no", seconds=0.1)
            continue
        if i == "crashes":
            sys.exit(7)
        emit(event="done", row=i, seconds=0.1, rows=[dict(op="op", shape="s", layout="-", direction="fwd",
             variant="ours: triton", ms=1.0, floor_ms=0.5), dict(op="op", shape="s", layout="-",
             direction="fwd", variant="peer: eager", ms=3.0, floor_ms=0.5)])
""")


def test_each_row_has_its_own_box_and_the_worker_restarts_past_it(lease, tmp_path, monkeypatch):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    real_popen = gpu_lease.subprocess.Popen

    def popen(command, **kwargs):  # run the stand-in instead of `python -m bench.lease`
        if command[1:3] == ["-m", "bench.lease"]:
            command = [command[0], str(worker)] + command[3:]
        return real_popen(command, **kwargs)

    monkeypatch.setattr(gpu_lease.subprocess, "Popen", popen)
    lease.step_rows("rows", "eager")
    rows = lease.results["rows"]
    assert {i: r["status"] for i, r in rows.items()} == {
        "fast": "ok", "hangs": "timeout", "raises": "failed", "crashes": "failed", "last": "ok"}
    assert "over its 2s box" in rows["hangs"]["note"] and "exited (7)" in rows["crashes"]["note"]
    assert lease.results["steps"][-1]["status"] == "partial"
    assert lease.problems()  # a rehearsal with such rows fails


NOTES_TABLE = textwrap.dedent("""
    ## Lease predictions

    | row | layout | direction | x floor at most | x peer at least | from |
    |---|---|---|---|---|---|
    | op | - | fwd | 1.5 | 2 | a count |
    | conv | any | fwd+bwd | - | 8 | another |

    | other | table |
    |---|---|
    | op | - |
""")


def test_predictions_and_verdicts(tmp_path):
    notes = tmp_path / "NOTES.md"
    notes.write_text(NOTES_TABLE)
    predictions = gpu_lease.read_predictions(str(notes))
    assert predictions == {("op", "-", "fwd"): dict(floor=1.5, peer=2.0, source="a count"),
                           ("conv", "any", "fwd+bwd"): dict(floor=None, peer=8.0, source="another")}
    p = predictions[("op", "-", "fwd")]
    assert gpu_lease.verdict(dict(x_floor=1.4, x_peer=3.0), p, gpu=True) == "met"
    assert gpu_lease.verdict(dict(x_floor=1.6, x_peer=3.0), p, gpu=True) == "missed (floor)"
    assert gpu_lease.verdict(dict(x_floor=1.6, x_peer=1.0), p, gpu=True) == "missed (floor, peer)"
    assert gpu_lease.verdict(dict(x_floor=None, x_peer=None), p, gpu=True) == "not measured"
    assert gpu_lease.verdict(dict(x_floor=1.0, x_peer=9.0), p, gpu=False) == "not measured (CPU)"
    assert gpu_lease.verdict(dict(x_floor=1.0, x_peer=9.0), None, gpu=True) == "no prediction"


def test_every_headline_row_has_a_prediction_in_the_notes():
    """bench/NOTES.md's table covers every row and direction bench/lease.py runs, so that no
    GPU row comes back without its met / missed."""
    from bench.lease import ROWS

    predictions = gpu_lease.read_predictions(gpu_lease.NOTES)
    whole_models = ("swin-t", "ultron-s", "sam-b")
    directions = {row: ("inference", "train step") for row in whole_models}
    for row_id in ROWS:
        for direction in directions.get(row_id, ("fwd", "fwd+bwd")):
            assert any(r == row_id and d == direction for r, _, d in predictions), (row_id, direction)


def _results(rehearse: bool) -> dict:
    rows = [dict(layout="nhwc", direction="fwd", variant="ours: cuda", ms=0.02, floor_ms=0.01,
                 first_call_ms=900.0),
            dict(layout="nhwc", direction="fwd", variant="ours: triton", ms=0.03, floor_ms=0.01,
                 first_call_ms=2500.0),
            dict(layout="nhwc", direction="fwd", variant="peer: split+conv+cat", ms=0.2, floor_ms=0.01)]
    compiled = [dict(layout="nhwc", direction="fwd", variant="peer: split+conv+cat compiled", ms=0.1,
                     floor_ms=0.01)]
    return {"lease": {"rehearse": rehearse, "budget_s": 450, "python": "3.12", "started": "now", "seconds": 400},
            "meta": {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "cuda": "13.0", "copy_TBps": 4.3},
            "steps": [dict(step="build", status="ok", seconds=60, box_s=200, note="")],
            "rows": {"dilated": dict(status="ok", rows=rows), "attn-s1": dict(status="timeout", note="over")},
            "compiled": {"dilated": dict(status="ok", rows=compiled)}}


def test_the_summary_table_on_a_gpu_and_in_a_rehearsal_has_the_same_columns():
    predictions = {("dilated", "nhwc", "fwd"): dict(floor=1.4, peer=5.0, source="")}
    gpu = gpu_lease.summary(_results(False), predictions)
    cpu = gpu_lease.summary(_results(True), predictions)
    header = [line for line in gpu.splitlines() if line.startswith("| row |")]
    assert header and header == [line for line in cpu.splitlines() if line.startswith("| row |")]
    # ours: the best fused backend; the best peer across the headline and compiled steps.
    line = next(line for line in gpu.splitlines() if line.startswith("| dilated | nhwc | fwd |"))
    assert "0.02 (cuda)" in line and "0.1 (split+conv+cat compiled)" in line
    assert "| 2.00 |" in line and "| 5.00 |" in line and "missed (floor)" in line
    assert "| attn-s1 | | | timeout: over |" in gpu
    results = _results(False)
    results["rows"]["dilated"]["rows"][1]["rel_err_vs_eager"] = 0.3
    assert "WRONG RESULT: triton rel. err 0.3 vs eager" in gpu_lease.summary(results, predictions)
    assert "Compile and autotune" in gpu and "3.4 s" in gpu  # (900 - 0.02) + (2500 - 0.03) ms
    assert "REHEARSAL" in cpu and "not measured (CPU)" in cpu and "REHEARSAL" not in gpu
