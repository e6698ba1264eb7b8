"""`python -m ultron`: the command line and the training loop's guard rails (a dataset that
cannot fill a batch, views that change every epoch, run directories never mixed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ultron.data import ImageFolderViews, SamplePhotos
from ultron.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--backend", "reference", "--no-progress"]


def _python_m_ultron(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    return subprocess.run([sys.executable, "-m", "ultron", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def image_folder(tmp_path):
    """8 small RGB images in 2 classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(tmp_path / "images")


def test_dataset_smaller_than_a_batch_is_an_error_not_a_hang(image_folder, tmp_path):
    proc = _python_m_ultron("train", "--data", image_folder, "--batch-size", "16", "--steps", "2",
                            "--out", str(tmp_path / "run"), *COMMON)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "8 images, 8 per process over 1 process(es): fewer than --batch-size 16" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("make", ["sample", "folder"])
def test_two_epochs_give_different_views(make, image_folder):
    data = SamplePhotos(32, length=8) if make == "sample" else ImageFolderViews(image_folder, 32)
    data.set_epoch(0)
    first = data[3][0]
    data.set_epoch(1)
    second = data[3][0]
    data.set_epoch(0)
    assert not torch.equal(first, second) and torch.equal(first, data[3][0])


def test_training_advances_the_epoch(tmp_path, monkeypatch):
    seen = []
    original = SamplePhotos.set_epoch
    monkeypatch.setattr(SamplePhotos, "set_epoch", lambda self, e: (seen.append(e), original(self, e)))
    # 64 sample views at batch 4: 16 steps per epoch, so 17 steps take two passes.
    assert train_main(["--batch-size", "4", "--steps", "17", "--image-size", "32",
                       "--out", str(tmp_path / "run"), *COMMON]) == 0
    assert seen == [0, 1]


def test_run_directory_is_never_mixed(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--batch-size", "4", "--image-size", "32", "--out", out, *COMMON]
    assert train_main(args + ["--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {os.path.join(out, 'checkpoint.pt')}" in printed
    # The console states what runs where (the new-user trial found it never did).
    assert "train: config ultron_tiny, backend " in printed and "device cpu x 1 process(es)" in printed
    assert train_main(args + ["--steps", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_main(args + ["--steps", "1", "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert steps == [1]
    assert train_main(args + ["--steps", "2", "--resume", "--config", "ultron_s"]) == 2
    assert "holds a 'ultron_tiny' run, not --config ultron_s" in capsys.readouterr().err
    fresh = str(tmp_path / "fresh")
    assert train_main(["--batch-size", "4", "--out", fresh, "--resume", *COMMON]) == 2
    assert f"--resume: no checkpoint at {os.path.join(fresh, 'checkpoint.pt')}" in capsys.readouterr().err


def test_help_of_every_command():
    top = _python_m_ultron("--help")
    assert top.returncode == 0 and "demo" in top.stdout and "train" in top.stdout
    demo = _python_m_ultron("demo", "--help")
    assert demo.returncode == 0 and "--batch-size" in demo.stdout and "parity:" not in demo.stdout
    train = _python_m_ultron("train", "--help")
    assert train.returncode == 0 and "(default: 100)" in train.stdout
    evaluate = _python_m_ultron("evaluate", "--help")
    assert evaluate.returncode == 0 and "--scales" in evaluate.stdout and "gnd_<name>.pkl" in evaluate.stdout
    assert _python_m_ultron().returncode == 2


def test_missing_model_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"pip install 'ultron_kernels\[model\]'"):
        SamplePhotos(32, length=4)
