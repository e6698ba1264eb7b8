"""`make gpu-lease`: the library's GPU numbers from one short GPU window.

One command on a bare GPU machine (its own python3, torch and triton, no network) that ends
within the wall-time budget and leaves four files in --out (the device tool brings back at
most eight):

  lease.log       every step's output, its time box and how it ended
  selfcheck.json  `python -m ultron_kernels`: parity of every op, backend and dtype, with shapes
  results.json    rewritten after every step and row: steps, headline rows, first calls, autotune choices
  summary.md      written last, always: one table to read in a minute, against bench/NOTES.md

The steps run in order of value, each in its own time box (never more than what is left); a
step that fails or runs out of time is recorded and the next one still runs:

  1. build      the CUDA extension in place for this machine's GPU (sm_90 on an H200), every core
  2. selfcheck
  3. headline   bench/lease.py's rows, each in its own box: the worker is restarted past a row
                that overruns, so a hung row costs its box and no more
  4. tests      the GPU tests (pytest -m gpu) in order of value, in the time left
  5. sanitizer  compute-sanitizer memcheck and racecheck on tools/sanitizer_workload.py
                ("not available" where it cannot run, e.g. on gVisor: not a failure)
  6. compiled   the torch.compile'd peers and variants of the headline rows, if time is left
  7. summary

Triton's autotuners time at most ULTRON_KERNELS_AUTOTUNE_CONFIGS configurations (the first
that fit, in each list's order of preference), so tuning costs seconds; the first call of
every variant is recorded and their sum is the compile time in summary.md.

This file imports only the standard library: a torch or triton that does not import shows
up as failed steps with their messages, not as a lost window.

``--rehearse`` runs the same script on the CPU (CI does): tiny shapes, Triton through its
interpreter, the CUDA kernels through their host simulation; the build step checks the
extension `make build` made (``--build`` builds it for sm_90 here too, as the GPU-versions
check does), and the sanitizer reports itself not available. Same files, same columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = os.path.join(ROOT, "bench", "NOTES.md")
PREDICTIONS_HEADING = "## Lease predictions"

# Wall-time budget of the whole lease (the 8 minutes, less a margin for the device
# tool's own start and transfers) and of a rehearsal on 2 CPU cores.
BUDGET_S = {"gpu": 450, "rehearse": 1500}
# Each step's own box on the GPU, and on the CPU rehearsal (the interpreter is slow).
BOXES = {
    "build": (200, 600), "selfcheck": (90, 400), "worker start": (60, 120),
    "tests": (90, 150), "memcheck": (50, 50), "racecheck": (50, 50),
}
SUMMARY_RESERVE_S = 8   # always kept for summary.md
WRONG = 5e-2            # our forward this far from the eager peer's (relative) is a wrong result, even in bf16
MIN_BOX_S = 5           # a step with less than this left is skipped, not started
AUTOTUNE_CONFIGS = "3"
# The GPU tests in order of value: the ops' parity first, the whole models last.
GPU_TEST_FILES = ["test_window_attention.py", "test_grouped_depthwise_conv.py", "test_dilated_conv.py",
                  "test_window_attention_variants.py", "test_decomposed_rel_pos.py", "test_edge_inputs.py",
                  "test_backends.py", "test_model.py", "test_swin_dropin.py", "test_timm_conv_dropin.py"]


class Lease:
    def __init__(self, out: str, rehearse: bool, build: bool, budget_s: float):
        self.out, self.rehearse, self.build = out, rehearse, build
        self.budget_s, self.start = budget_s, time.monotonic()
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "lease.log"), "a", buffering=1)
        self.results = {"lease": {"rehearse": rehearse, "budget_s": budget_s,
                                  "kernel": platform.release(), "python": sys.version.split()[0],
                                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                      timespec="seconds")},
                        "meta": {}, "steps": [], "rows": {}, "compiled": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", ULTRON_KERNELS_AUTOTUNE_CONFIGS=AUTOTUNE_CONFIGS,
                        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                    os.environ.get("PYTHONPATH", "")]))
        if rehearse:
            self.env.update(TRITON_INTERPRET="1", ULTRON_KERNELS_CUDA_SIM="1", CUDA_VISIBLE_DEVICES="")

    # ------------------------------------------------------------ time and records

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def box(self, name: str) -> float:
        return min(BOXES[name][1 if self.rehearse else 0], self.left() - SUMMARY_RESERVE_S)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {scrub(text)}"
        self.log.write(line + "\n")
        print(line, flush=True)

    def record(self, step: dict) -> dict:
        self.results["steps"].append(step)
        self.say(f"== {step['step']}: {step['status']} ({step['seconds']:.0f}s of a {step['box_s']:.0f}s box)"
                 + (f": {step['note']}" if step.get("note") else ""))
        self.save()
        return step

    def save(self) -> None:
        """results.json, replaced whole (a lease cut off mid-write still leaves the last one);
        the steps' full output is in lease.log, not here."""
        path = os.path.join(self.out, "results.json")
        steps = [{k: v for k, v in step.items() if k != "output"} for step in self.results["steps"]]
        with open(path + ".part", "w") as f:
            f.write(scrub(json.dumps(dict(self.results, steps=steps), indent=1, default=str)))
        os.replace(path + ".part", path)

    # ------------------------------------------------------------ running a step

    def run(self, name: str, command: list[str], box: float, env: dict | None = None) -> dict:
        """``command`` under ``box`` seconds; its output goes to the log. Returns the step's record."""
        if box < MIN_BOX_S:
            return self.record(dict(step=name, status="skipped", seconds=0, box_s=max(box, 0),
                                    note="no time left"))
        shown = " ".join(arg if "\n" not in arg else repr(arg.splitlines()[0] + " ...") for arg in command)
        self.say(f"== {name} (box {box:.0f}s): {shown}")
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   start_new_session=True)
        lines = _reader(process)
        output, status = [], None
        while status is None:
            try:
                line = lines.get(timeout=max(0.1, box - (time.monotonic() - started)))
            except queue.Empty:
                line = "" if time.monotonic() - started < box else None
            if line is None:  # the box is over
                _kill(process)
                status = "timeout"
            elif line is _EOF:
                status = "ok" if process.wait() == 0 else "failed"
            elif line:
                output.append(line)
                self.log.write(f"  {scrub(line)}")
        return self.record(dict(step=name, status=status, rc=process.returncode, seconds=time.monotonic() - started,
                                box_s=box, tail="".join(output[-30:])[-3000:], output=output))

    # ------------------------------------------------------------ the steps

    def step_build(self) -> None:
        if not self.rehearse or self.build:
            env = dict(self.env, MAX_JOBS=str(os.cpu_count() or 4), ULTRON_KERNELS_BUILD_CUDA="1",
                       ULTRON_KERNELS_BUILD_SIM="1" if self.rehearse else "0")
            if self.rehearse:  # no GPU to build for: the H200's architecture
                env["TORCH_CUDA_ARCH_LIST"] = "9.0"
            include = _pip_cuda_include()
            if include:  # headers torch includes that some toolkits lack (cusparse.h)
                env["CPLUS_INCLUDE_PATH"] = os.pathsep.join([include, env.get("CPLUS_INCLUDE_PATH", "")])
            self.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], self.box("build"), env)
        what = "_C_sim" if self.rehearse else "_C"
        # Every module of the package, the model and the benchmark imports with this machine's
        # torch and triton, and the extension loads.
        check = self.run("build check", [sys.executable, "-c", (
            "import importlib, pkgutil, sys\n"
            "import ultron_kernels, ultron, bench\n"
            "for package in (ultron_kernels, ultron, bench):\n"
            "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
            "        if not module.name.rsplit('.', 1)[-1].startswith(('__main__', 'test_')):\n"
            "            importlib.import_module(module.name)\n"
            "import ultron_kernels._cuda as c\n"
            f"error = c.{'SIM_EXTENSION_ERROR' if self.rehearse else 'CUDA_EXTENSION_ERROR'}\n"
            f"print('every module imports; ultron_kernels.{what}:', error or 'loaded', "
            "'| built for:', c.built_arch_list() or '-')\n"
            "sys.exit(1 if error else 0)")], min(90.0, self.left() - SUMMARY_RESERVE_S))
        check["note"] = check["tail"].strip().splitlines()[-1][:300] if check["tail"].strip() else ""

    def step_selfcheck(self) -> None:
        # Fixed Triton configurations: parity needs no tuning (the headline rows run the tuned
        # launches and check them against the eager peer).
        step = self.run("selfcheck", [sys.executable, "-m", "ultron_kernels", "--json",
                                      os.path.join(self.out, "selfcheck.json")], self.box("selfcheck"),
                        dict(self.env, ULTRON_KERNELS_AUTOTUNE="0"))
        step["note"] = _last_line(step, ("all checks passed", "MISMATCH", "FAILED"))

    def step_rows(self, key: str, mode: str) -> None:
        """The worker (bench/lease.py) over every row, each under its own box."""
        rows = self.results[key]
        pending: list[str] | None = None  # unknown until the worker's meta line lists them
        started, allowed = time.monotonic(), self.left() - SUMMARY_RESERVE_S
        while pending is None or pending:
            if self.left() - SUMMARY_RESERVE_S < MIN_BOX_S:
                for row_id in pending or []:
                    rows[row_id] = dict(rows.get(row_id, {}), status="skipped", note="no time left")
                break
            command = [sys.executable, "-m", "bench.lease", "--mode", mode, "--rows",
                       "all" if pending is None else ",".join(pending)] + (["--rehearse"] if self.rehearse else [])
            self.say(f"== {key} worker: {' '.join(command[1:])}")
            process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, errors="replace",
                                       start_new_session=True)
            lines = _reader(process)
            current, deadline = None, time.monotonic() + self.box("worker start")
            tail: list[str] = []
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    line = None if time.monotonic() >= deadline else ""
                if line is None:  # the box of the row in flight (or of the start) is over
                    _kill(process)
                    if current is None:
                        for row_id in pending or []:
                            rows[row_id] = dict(status="failed", note="the worker did not start in its box")
                        pending = []
                    else:
                        rows[current].update(status="timeout", seconds=time.monotonic() - rows[current]["t0"],
                                             note=f"over its {rows[current]['box_s']:.0f}s box")
                        pending.remove(current)
                    break
                if line is _EOF:
                    process.wait()
                    if pending is None:  # died before its meta line: nothing can run
                        self.results[key + "_error"] = "".join(tail)[-3000:]
                        self.say(f"== {key}: the worker failed before its first row (exit {process.returncode})")
                        pending = []
                    elif current is not None:
                        rows[current].update(status="failed", note=f"the worker exited ({process.returncode}) "
                                             f"in this row: " + "".join(tail[-5:])[-500:])
                        pending.remove(current)
                    break
                if not line.startswith("LEASE "):
                    tail = (tail + [line])[-40:]
                    if line:
                        self.log.write(f"  {scrub(line)}")
                    continue
                event = json.loads(line[len("LEASE "):])
                if event["event"] == "meta":
                    listed = event.pop("rows")
                    self.results["meta"].update(event)
                    if pending is None:
                        pending = list(listed)
                        for row_id, spec in listed.items():
                            rows[row_id] = dict(title=spec["title"], box_s=spec["box_s"], status="pending")
                    deadline = time.monotonic() + 1e9  # until a row starts
                elif event["event"] == "start":
                    current = event["row"]
                    box = min(rows[current]["box_s"], self.left() - SUMMARY_RESERVE_S)
                    rows[current].update(status="running", t0=time.monotonic(), box_s=box)
                    deadline = time.monotonic() + box
                    self.say(f"   {key} {current}: started (box {box:.0f}s)")
                else:  # done or error
                    row = rows[event["row"]]
                    row.update(status="ok" if event["event"] == "done" else "failed",
                               seconds=event.get("seconds"), rows=event.get("rows", []),
                               autotune=event.get("autotune", {}), note=event.get("error", ""),
                               traceback=event.get("traceback", ""))
                    pending.remove(event["row"])
                    current = None
                    self.say(f"   {key} {event['row']}: {row['status']} in {row['seconds']:.1f}s"
                             + (f": {row['note']}" if row["note"] else ""))
                    self.save()
            self.save()
        for row in rows.values():
            row.pop("t0", None)
        done = [r for r in rows.values() if r.get("status") == "ok"]
        self.record(dict(step=key, status="ok" if rows and len(done) == len(rows) else "partial" if done else "failed",
                         seconds=time.monotonic() - started, box_s=allowed,
                         note=f"{len(done)} of {len(rows)} rows, each in its own box"))

    def step_tests(self) -> None:
        if self.rehearse:
            # The CPU has no GPU tests to run: collect them (every test file imports), run none.
            command = ["--collect-only", "-q"]
        else:
            command = ["-v", "-rfE"]
        env = dict(self.env, ULTRON_KERNELS_SWEEP="3", ULTRON_KERNELS_AUTOTUNE="0")
        step = self.run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
                                  *command, *[os.path.join("tests", f) for f in GPU_TEST_FILES]],
                        self.box("tests"), env)
        output = "".join(step.get("output", []))
        counts = {word: len(re.findall(rf" {word.upper()}\b", output)) for word in ("passed", "failed", "error")}
        summary = re.findall(r"^=+ (.* in [\d.]+s.*) =+$", output, re.M)
        step["note"] = summary[-1] if summary else ", ".join(f"{n} {w}" for w, n in counts.items())
        step["counts"] = counts
        self.save()

    def step_sanitizer(self) -> None:
        why_not = _sanitizer_unavailable(self.rehearse)
        for tool in ("memcheck", "racecheck"):
            if why_not:
                self.record(dict(step=tool, status="not available", seconds=0, box_s=0, note=why_not))
                continue
            step = self.run(tool, ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                                   sys.executable, "tools/sanitizer_workload.py"], self.box(tool))
            output = "".join(step.get("output", []))
            if "Device not supported" in output or "error 999" in output.lower():
                step.update(status="not available", note="compute-sanitizer cannot use this GPU here "
                            "(as on gVisor machines)")
                why_not = step["note"]
            else:
                step["note"] = _last_line(step, ("ERROR SUMMARY",))
            self.save()

    def problems(self) -> list[str]:
        bad = [f"step {s['step']}: {s['status']}" for s in self.results["steps"]
               if s["status"] not in ("ok", "not available")]
        bad += [f"{key} {row_id}: {row.get('status')} {row.get('note', '')}" for key in ("rows", "compiled")
                for row_id, row in self.results[key].items() if row.get("status") != "ok"]
        return bad

    def finish(self) -> str:
        self.results["lease"]["seconds"] = time.monotonic() - self.start
        self.save()
        text = scrub(summary(self.results, read_predictions(NOTES)))
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(text)
        self.say("summary.md written")
        print(text)
        return text


# ---------------------------------------------------------------- helpers

_EOF = object()


def scrub(text: str) -> str:
    """``text`` without the machine's own folders (the checkout, the Python installation), which
    have no place in the committed files."""
    for folder, name in ((ROOT, "."), (sys.prefix, "<python>"), (sys.base_prefix, "<python>")):
        text = text.replace(folder + os.sep, name + os.sep).replace(folder, name)
    return text


def _reader(process: subprocess.Popen) -> queue.Queue:
    """A queue of the process's output lines, then _EOF (read on a thread: the caller waits
    on the queue with a deadline)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in process.stdout:
            lines.put(line)
        lines.put(_EOF)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _last_line(step: dict, starts: tuple) -> str:
    lines = [line.strip() for line in step.get("output", []) if line.strip().startswith(starts)
             or any(s in line for s in starts)]
    return lines[-1][:300] if lines else ""


def _pip_cuda_include() -> str:
    """pip's CUDA headers (nvidia/cu13/include), found without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isdir(os.path.join(root, "cu13", "include")):
            return os.path.join(root, "cu13", "include")
    return ""


def _sanitizer_unavailable(rehearse: bool) -> str:
    if rehearse:
        return "rehearsal on the CPU: compute-sanitizer needs a GPU"
    if not shutil.which("compute-sanitizer"):
        return "compute-sanitizer is not on the PATH"
    if platform.release().startswith("4.4.0"):  # gVisor's kernel version: the tool refuses the device
        return "gVisor machine (kernel 4.4.0): compute-sanitizer does not work there"
    return ""


# ---------------------------------------------------------------- predictions and summary

def read_predictions(path: str) -> dict:
    """The table under PREDICTIONS_HEADING in bench/NOTES.md: (row, layout, direction) ->
    {"floor": at most x the floor, "peer": at least x the best peer, "from": where it comes from}."""
    try:
        text = open(path).read()
    except OSError:
        return {}
    if PREDICTIONS_HEADING not in text:
        return {}
    table = []
    for line in text.split(PREDICTIONS_HEADING, 1)[1].splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:  # the first table under the heading only
            break
    predictions = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6:
            continue
        row, layout, direction, floor, peer, source = cells[:6]
        predictions[(row, layout, direction)] = dict(floor=_number(floor), peer=_number(peer), source=source)
    return predictions


def _number(cell: str):
    try:
        return float(cell)
    except ValueError:
        return None


def _best(rows: list[dict], prefix: str):
    timed = [r for r in rows if r["variant"].startswith(prefix) and r.get("ms") is not None]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def summary_rows(results: dict, predictions: dict) -> list[dict]:
    """One line per (row, layout, direction): our best variant against the best peer of the
    headline and compiled steps, the floor, the prediction and whether it was met."""
    gpu = not results["lease"]["rehearse"]
    lines = []
    for row_id, row in results["rows"].items():
        measured = row.get("rows", []) + results["compiled"].get(row_id, {}).get("rows", [])
        groups = {}
        for r in measured:
            groups.setdefault((r["layout"], r["direction"]), []).append(r)
        if not groups:
            lines.append(dict(row=row_id, layout="", direction="", status=f"{row.get('status')}: {row.get('note', '')}"))
            continue
        for (layout, direction), group in groups.items():
            ours, peer = _best(group, "ours"), _best(group, "peer")
            floor_ms = group[0].get("floor_ms")
            line = dict(row=row_id, layout=layout, direction=direction, ours=ours, peer=peer,
                        x_floor=ours["ms"] / floor_ms if gpu and ours and floor_ms else None,
                        x_peer=peer["ms"] / ours["ms"] if gpu and ours and peer else None)
            prediction = predictions.get((row_id, layout, direction)) or predictions.get((row_id, "any", direction))
            line["prediction"] = prediction
            line["verdict"] = verdict(line, prediction, gpu)
            wrong = [r for r in group if r["variant"].startswith("ours") and (r.get("rel_err_vs_eager") or 0) > WRONG]
            if wrong:  # fast and wrong is not a result
                line["verdict"] = "WRONG RESULT: " + ", ".join(
                    f"{r['variant'][6:]} rel. err {r['rel_err_vs_eager']:.2g} vs eager" for r in wrong)
            lines.append(line)
    return lines


def verdict(line: dict, prediction, gpu: bool) -> str:
    if prediction is None:
        return "no prediction"
    if not gpu:
        return "not measured (CPU)"
    checks = []
    if prediction["floor"] is not None and line["x_floor"] is not None:
        checks.append(("floor", line["x_floor"] <= prediction["floor"]))
    if prediction["peer"] is not None and line["x_peer"] is not None:
        checks.append(("peer", line["x_peer"] >= prediction["peer"]))
    if not checks:
        return "not measured"
    missed = [name for name, ok in checks if not ok]
    return "met" if not missed else f"missed ({', '.join(missed)})"


def _ms(r) -> str:
    if r is None:
        return "-"
    name = r["variant"].split(": ", 1)[-1]
    return f"{r['ms']:.4g} ({name})"


def _peak_mb(line: dict) -> str:
    """Peak memory (MB) of ours and of the best peer, as ``ours / peer``."""
    def mb(r):
        return f"{r['peak_mb']:.0f}" if r and r.get("peak_mb") is not None else "-"
    return f"{mb(line['ours'])} / {mb(line['peer'])}"


def _x(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def summary(results: dict, predictions: dict) -> str:
    meta, lease = results["meta"], results["lease"]
    out = [f"# gpu-lease: {meta.get('device', 'device unknown (the worker did not start)')}, {lease['started']}", ""]
    if lease["rehearse"]:
        out += ["**REHEARSAL on the CPU** (tiny shapes; Triton's interpreter, the CUDA host simulation): "
                "these times check the script, not the kernels; no floors, speedups or verdicts.", ""]
    out += [f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, CUDA {meta.get('cuda', '?')}, "
            f"Python {lease['python']}; copy bandwidth {meta.get('copy_TBps', 0):.2f} TB/s; "
            f"wall {lease.get('seconds', 0):.0f} s of a {lease['budget_s']:.0f} s budget.", ""]
    compile_s = sum((r["first_call_ms"] - r["ms"]) / 1e3 for key in ("rows", "compiled")
                    for row in results[key].values() for r in row.get("rows", [])
                    if r["variant"].startswith("ours") and r.get("first_call_ms") and r.get("ms"))
    out += [f"Compile and autotune (first calls of our kernels, over their steady time, all rows): "
            f"{compile_s:.1f} s; autotuning capped at {AUTOTUNE_CONFIGS} configurations per kernel and key.", ""]
    out += ["| row | layout | dir | ours ms | x floor | best peer ms | x vs peer | peak MB ours / peer | "
            "predicted (x floor <=, x peer >=) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for line in summary_rows(results, predictions):
        if "status" in line:
            out.append(f"| {line['row']} | | | {line['status'][:120]} | | | | | | |")
            continue
        p = line["prediction"]
        predicted = f"{_x(p['floor']) if p and p['floor'] else '-'}, {_x(p['peer']) if p and p['peer'] else '-'}" \
            if p else "-"
        out.append(f"| {line['row']} | {line['layout']} | {line['direction']} | {_ms(line['ours'])} | "
                   f"{_x(line['x_floor'])} | {_ms(line['peer'])} | {_x(line['x_peer'])} | {_peak_mb(line)} | "
                   f"{predicted} | {line['verdict']} |")
    out += ["", "| step | status | seconds | box | note |", "|---|---|---|---|---|"]
    for step in results["steps"]:
        note = str(step.get("note", "")).replace("|", "/").replace("\n", " ")[:160]
        out.append(f"| {step['step']} | {step['status']} | {step['seconds']:.0f} | {step['box_s']:.0f} | {note} |")
    firsts = []
    for row_id, row in results["rows"].items():
        ours: dict = {}
        for r in row.get("rows", []):
            if r["variant"].startswith("ours") and r.get("first_call_ms") is not None:
                seconds = ours.setdefault(r["variant"][6:], {"fwd": 0.0, "fwd+bwd": 0.0})
                seconds[r["direction"]] += r["first_call_ms"] / 1e3
        if ours:
            firsts.append(f"{row_id}: " + ", ".join(
                f"{name} {t['fwd']:.1f}/{t['fwd+bwd']:.1f} s" for name, t in ours.items()))
    if firsts:
        out += ["", "First calls of ours (fwd / then fwd+bwd; layouts summed): " + "; ".join(firsts) + "."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_lease.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu-lease"),
                   help="folder for the four files (default: $OUT, else runs/gpu-lease)")
    p.add_argument("--rehearse", action="store_true", help="the same script on the CPU, tiny shapes")
    p.add_argument("--build", action="store_true", help="with --rehearse: build the extension (sm_90) here too")
    p.add_argument("--budget", type=float, default=None, help="wall-time budget in seconds "
                   f"(default {BUDGET_S['gpu']}; rehearsal {BUDGET_S['rehearse']})")
    p.add_argument("--steps", default="build,selfcheck,headline,tests,sanitizer,compiled",
                   help="the steps to run, in their fixed order (default: all)")
    args = p.parse_args(argv)
    lease = Lease(args.out, args.rehearse, args.build,
                  args.budget or BUDGET_S["rehearse" if args.rehearse else "gpu"])
    steps = args.steps.split(",")
    lease.say(f"gpu-lease {'rehearsal ' if args.rehearse else ''}in {args.out}, budget {lease.budget_s:.0f}s")
    runners = {"build": lease.step_build, "selfcheck": lease.step_selfcheck,
               "headline": lambda: lease.step_rows("rows", "eager"), "tests": lease.step_tests,
               "sanitizer": lease.step_sanitizer, "compiled": lambda: lease.step_rows("compiled", "compiled")}
    unknown = [s for s in steps if s not in runners]
    if unknown:
        p.error(f"--steps: unknown {unknown}; choose from {list(runners)}")
    for name, runner in runners.items():
        if name in steps:
            try:
                runner()
            except Exception as exc:  # a bug here must not cost the window's other steps
                lease.record(dict(step=name, status="failed", seconds=0, box_s=0,
                                  note=f"lease script error: {type(exc).__name__}: {exc}"))
    lease.finish()
    # On the GPU the files are what counts (exit 0); a rehearsal is a test, and fails on any
    # step or row that did not end well.
    return 1 if args.rehearse and lease.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
