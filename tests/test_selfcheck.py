"""`python -m ultron_kernels`, the self-check users run and attach to bug reports: it reports
the environment and every backend's availability, checks every available backend against
float64 (CPU here: Triton through its interpreter, CUDA through its simulation), writes JSON,
and exits non-zero on a mismatch."""

import json
import os
import subprocess
import sys

import pytest
import torch

import ultron_kernels as uk
from helpers import ROOT
from ultron_kernels import selfcheck


def test_selfcheck_command_on_this_machine(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ULTRON_KERNELS_CUDA_SIM")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "ultron_kernels", "--json", str(out), "--bench"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["environment"]["torch"] == torch.__version__
    runnable = sorted(name for name, why in report["backends"].items() if why == "available")
    assert runnable == sorted(name for name, why in uk.available_backends(report["device"]).items()
                              if why == "available")
    checked = {(r["backend"], r["op"], r["dtype"]) for r in report["checks"]}
    assert checked == {(b, op, dt) for b in runnable for op in selfcheck.OPS for dt in selfcheck.DTYPES}
    if not torch.cuda.is_available():
        assert runnable == ["cuda", "reference", "triton"]  # interpreter and simulation
        assert report["bench"].startswith("timings need a GPU")


def test_selfcheck_fails_on_a_wrong_result(tmp_path, monkeypatch):
    """A backend that is 1% off is a mismatch: exit code 1 and the row says which output.
    (The two ops it feeds, in fp32: the command test above runs them all.)"""
    from ultron_kernels.triton import grouped_depthwise_conv

    forward = grouped_depthwise_conv.grouped_conv_forward
    monkeypatch.setattr(grouped_depthwise_conv, "grouped_conv_forward", lambda *a, **k: forward(*a, **k).mul_(1.01))
    monkeypatch.setattr(selfcheck, "DTYPES", {"fp32": torch.float32})
    monkeypatch.setattr(selfcheck, "OPS", {name: selfcheck.OPS[name]
                                           for name in ("channelwise_dilated_conv2d", "grouped_depthwise_conv2d")})
    out = tmp_path / "report.json"
    assert selfcheck.main(["--json", str(out)]) == 1
    rows = json.loads(out.read_text())["checks"]
    bad = {(r["backend"], r["op"]) for r in rows if not r["ok"]}
    assert bad == {("triton", "channelwise_dilated_conv2d"), ("triton", "grouped_depthwise_conv2d")}, bad
    assert all(r["worst"].startswith("out:") for r in rows if not r["ok"])


def test_json_alone_prints_the_report_with_shapes_and_modes(capsys, monkeypatch):
    """`--json` with no file writes the JSON to stdout (the table goes to stderr); every row
    names the shape it checked; on the CPU the fused backends say what they run on. (One
    dtype: the command test above runs them all.)"""
    monkeypatch.setattr(selfcheck, "DTYPES", {"fp32": torch.float32})
    assert selfcheck.main(["--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert "all checks passed" in out.err
    assert all(row["shape"] == selfcheck.SHAPES[row["op"]] for row in report["checks"])
    for shape in selfcheck.SHAPES.values():
        assert shape in out.err
    if not torch.cuda.is_available():
        assert "interpreter" in report["backend_modes"]["triton"]
        assert "simulation" in report["backend_modes"]["cuda"]
        assert "interpreter" in out.err and "host simulation" in out.err


def test_a_bogus_backend_variable_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "parity_checks", lambda device, backends: [])  # not what is checked here
    monkeypatch.setenv("ULTRON_KERNELS_BACKEND", "bogus")
    assert selfcheck.main([]) == 1
    text = capsys.readouterr().out
    assert "ULTRON_KERNELS_BACKEND='bogus' is not a backend" in text and "FAILED" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_cuda_without_a_gpu_gives_the_reason(capsys):
    """`--device cuda` and `available_backends('cuda')` on a machine without a GPU: the reason,
    not torch's raw "Found no NVIDIA driver"; and a CPU user is not told to rebuild with nvcc."""
    reasons = uk.available_backends("cuda")
    assert all(why.startswith("no CUDA device") for why in reasons.values()), reasons
    assert selfcheck.main(["--device", "cuda"]) == 1
    text = capsys.readouterr().out
    assert "PROBLEM: no CUDA device" in text and "Traceback" not in text
    status = selfcheck.environment()["cuda_extension"]
    assert status == "loaded" or status.startswith("not built; not needed here"), status
