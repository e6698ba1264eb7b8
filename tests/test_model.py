"""The reference ULTRON model: kernel swap-in parity, bad input, checkpoints, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ultron
import ultron_kernels as uk
from ultron.data import sample_batch
from ultron.parity import compare_backends, failures
from ultron.train import load_checkpoint, main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_batch():
    images, labels, classes = sample_batch(2, 64)
    return images, labels, classes


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tiny_model_parity_vs_reference(tiny_batch, backend):
    """Whole-model parity on the CPU: Triton through its interpreter, CUDA through the host
    simulation (ultron_kernels._C_sim)."""
    if uk.available_backends("cpu")[backend] != "available":
        pytest.skip(uk.available_backends("cpu")[backend])
    images, labels, classes = tiny_batch
    torch.manual_seed(0)
    # layer scale 0.5 (not 1e-6) so that every block's kernels shape the output.
    model = ultron.build("ultron_tiny", num_classes=classes, layer_scale_init=0.5)
    result = compare_backends(model, backend, images, labels)
    assert result["swapped"] == 8
    assert not failures(result, "float32"), result


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["float32", "bf16-autocast"])
def test_ultron_s_parity_gpu(backend, mode):
    if uk.available_backends("cuda")[backend] != "available":
        pytest.skip(uk.available_backends("cuda")[backend])
    images, labels, classes = sample_batch(8, 224)
    torch.manual_seed(0)
    model = ultron.build("ultron_s", num_classes=classes, layer_scale_init=0.5).cuda()
    result = compare_backends(model, backend, images.cuda(), labels.cuda(),
                              torch.bfloat16 if mode == "bf16-autocast" else None)
    assert not failures(result, mode), result


def test_state_dict_moves_between_backends():
    ref = ultron.build("ultron_tiny", backend="reference", num_classes=3)
    fused = ultron.build("ultron_tiny", backend="triton", num_classes=3)
    fused.load_state_dict(ref.state_dict())
    assert ref.state_dict().keys() == fused.state_dict().keys()


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m(torch.randn(1, 3, 60, 64)), ValueError, "multiples of 32"),
    (lambda m: m(torch.randn(1, 4, 64, 64)), ValueError, r"expected \(B, 3, H, W\)"),
])
def test_bad_images(call, error, match):
    with pytest.raises(error, match=match):
        call(ultron.build("ultron_tiny", num_classes=3))


def test_bad_config_and_backend():
    with pytest.raises(ValueError, match="unknown ULTRON config 'ultron_xl'"):
        ultron.build("ultron_xl")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        ultron.build("ultron_tiny", backend="tpu")
    with pytest.raises(ValueError, match="unknown override"):
        ultron.build("ultron_tiny", depth=3)


def test_train_resume_and_checkpoint_errors(tmp_path):
    out = str(tmp_path / "run")
    common = ["--backend", "reference", "--batch-size", "4", "--out", out, "--no-progress",
              "--save-every", "2"]
    assert train_main(common + ["--steps", "2"]) == 0
    assert train_main(common + ["--steps", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert steps == [1, 2, 3]
    model = ultron.build("ultron_tiny", num_classes=3)  # the sample set has 8 classes
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="does not match this model"):
        load_checkpoint(os.path.join(out, "checkpoint.pt"), model, opt, sched)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_checkpoint(str(corrupt), model, opt, sched)


def test_ddp_two_gloo_processes_keep_parameters_identical(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29533", "-m", "ultron", "train", "--backend", "reference",
           "--batch-size", "4", "--steps", "12", "--lr", "3e-3", "--warmup", "1",
           "--out", str(out), "--no-progress", "--save-every", "12"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == dict(steps=12, world_size=2, parameters_identical_across_ranks=True)
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


def test_imports_leave_triton_unloaded():
    """TRITON_INTERPRET only works if set before triton is imported: importing our packages
    must not import it (a torch._dynamo import would)."""
    code = ("import sys, ultron_kernels, ultron, ultron.model; "
            "sys.exit(int('triton' in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=300).returncode == 0


def test_demo_main_job_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python")])
    proc = subprocess.run([sys.executable, "-m", "ultron", "demo"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "parity: PASS" in proc.stdout
    if not torch.cuda.is_available():
        assert "timings need a GPU" in proc.stdout
