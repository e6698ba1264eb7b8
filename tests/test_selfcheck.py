"""`python -m ultron_kernels`, the self-check users run and attach to bug reports: it reports
the environment and every backend's availability, checks every available backend against
float64 (CPU here: Triton through its interpreter, CUDA through its simulation), writes JSON,
and exits non-zero on a mismatch."""

import json
import os
import subprocess
import sys

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
    """A backend that is 1% off is a mismatch: exit code 1 and the row says which output."""
    from ultron_kernels.triton import grouped_depthwise_conv

    forward = grouped_depthwise_conv.grouped_conv_forward
    monkeypatch.setattr(grouped_depthwise_conv, "grouped_conv_forward", lambda *a, **k: forward(*a, **k).mul_(1.01))
    out = tmp_path / "report.json"
    assert selfcheck.main(["--json", str(out)]) == 1
    rows = json.loads(out.read_text())["checks"]
    bad = {(r["backend"], r["op"]) for r in rows if not r["ok"]}
    assert bad == {("triton", "channelwise_dilated_conv2d"), ("triton", "grouped_depthwise_conv2d")}, bad
    assert all(r["worst"].startswith("out:") for r in rows if not r["ok"])
