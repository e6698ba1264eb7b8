"""The benchmark harness on the CPU (tiny preset): every variant of a case computes the same
op as the eager peer, and a run writes its JSON, table and plots. Timings need a GPU; these
tests check what the timings are of."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench.__main__ import agreement, main
from ultron_kernels.backends import BackendUnavailableError
from helpers import ROOT
from bench.cases import (ATTN_SHAPES, CONV_SHAPES, DEPTHWISE_LAYERS, GROUPED_MODULES, REL_POS_SHAPES, attention_cases,
                         conv_cases, cosine_attention_cases, depthwise_cases, grouped_conv_cases, rel_pos_cases)


@pytest.mark.parametrize("build,table", [(conv_cases, CONV_SHAPES), (grouped_conv_cases, GROUPED_MODULES),
                                         (depthwise_cases, DEPTHWISE_LAYERS),
                                         (attention_cases, ATTN_SHAPES), (cosine_attention_cases, ATTN_SHAPES),
                                         (rel_pos_cases, REL_POS_SHAPES)],
                         ids=["conv", "grouped conv modules", "depthwise layers", "attention", "cosine attention",
                              "decomposed rel pos"])
def test_every_variant_agrees_with_eager(build, table):
    # Several shapes per op (attention: a 3D window too): a variant that read another case's
    # shape (a closure bound late) computes a different result or fails, and this catches it.
    cases = build(table["tiny"], torch.float32, torch.device("cpu"))
    assert len({case.shape for case in cases}) == len(table["tiny"]) >= 2
    for case in cases:
        errors = agreement(case)
        compared = [name for name in case.variants if name != next(iter(case.variants))]
        for name in set(compared) - set(errors):
            # Only a backend that declines with its reason (the timing reports it) may miss.
            with pytest.raises(BackendUnavailableError, match="runs on the reference backend only"):
                case.variants[name](*case.inputs[0])
        assert errors, f"{case.shape}: no variant ran"
        assert all(err < 1e-5 for err in errors.values()), (case.shape, errors)


def test_run_writes_results(tmp_path, monkeypatch, capsys):
    """A CPU run writes its JSON and table with the CPU caveat and no speedups (interpreter
    times are noise), in a folder of its own; a missing matplotlib is a note, not a crash."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["--op", "conv", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert "no plots: matplotlib is not installed" in capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"] and all(row["ms"] is not None for row in result["rows"])
    assert all(row["speedup_vs_best_peer"] is None and row["floor_fraction"] is None for row in result["rows"])
    table = (tmp_path / "results.md").read_text()
    assert "CPU run: " in table and "x |" not in table
    first = os.path.join(ROOT, result["meta"]["folder"])
    runs = set(os.listdir(os.path.dirname(first)))
    assert main(["--op", "conv", "--preset", "tiny"]) == 0
    assert os.path.isfile(os.path.join(first, "results.json"))
    assert len(set(os.listdir(os.path.dirname(first))) - runs) == 1, "a run overwrote another"


def test_swin_model_rows_run_on_the_cpu():
    """The whole-model Swin cases (timm, tiny preset): every variant runs, and swapped-in
    variants compute eager's logits."""
    from bench.__main__ import SWIN_MODELS, timm_model_rows

    rows = timm_model_rows(torch.device("cpu"), SWIN_MODELS["tiny"])
    variants = {r["variant"] for r in rows}
    assert "peer: eager" in variants and any(v.startswith("ours: ") for v in variants), variants
    assert all(r["ms"] is not None for r in rows), [r for r in rows if r["ms"] is None]
    assert all(r["rel_err_vs_eager"] < 1e-4 for r in rows), rows
    assert all(r["note"] == "4 modules swapped" for r in rows if r["variant"].startswith("ours")), rows


def test_video_swin_model_rows_run_on_the_cpu():
    """A torchvision model by builder (a small SwinTransformer3d on a 4 x 16 x 16 clip: 3D
    windows), through the CUDA simulation: every variant runs and computes eager's logits."""
    from bench.__main__ import VIDEO_SWIN_TINY, timm_model_rows

    rows = timm_model_rows(torch.device("cpu"), [VIDEO_SWIN_TINY], backends=["cuda"])
    assert {r["shape"] for r in rows} == {"B1 4x16x16"}, rows
    assert all(r["ms"] is not None for r in rows), [r for r in rows if r["ms"] is None]
    assert all(r["rel_err_vs_eager"] < 1e-4 for r in rows), rows
    assert all(r["note"] == "4 modules swapped" for r in rows if r["variant"].startswith("ours")), rows


def test_convnet_model_rows_run_on_the_cpu():
    """The whole-model convnet case (timm, tiny preset: InceptionNeXt-atto at 32x32, batch-norm
    statistics restored between variants): the same checks, with every token mixer swapped.
    The CUDA simulation only: the harness is what is checked, and the interpreter would take
    minutes for the NCHW model."""
    from bench.__main__ import CONVNET_MODELS, timm_model_rows

    rows = timm_model_rows(torch.device("cpu"), CONVNET_MODELS["tiny"], backends=["cuda"])
    assert all(r["ms"] is not None for r in rows), [r for r in rows if r["ms"] is None]
    assert all(r["rel_err_vs_eager"] < 1e-4 for r in rows), rows
    assert all(r["note"].endswith("modules swapped") for r in rows if r["variant"].startswith("ours")), rows
    assert all(r["layout"] == "nhwc" for r in rows), rows  # the preset's channels_last option


def test_extraction_rows_give_images_per_second_on_the_cpu():
    """`--op extraction` (ULTRON's retrieval descriptors; tiny on the CPU, through the CUDA
    simulation): every variant runs and reports its images per second."""
    from bench.__main__ import EXTRACTION, model_rows

    rows = model_rows(torch.device("cpu"), *EXTRACTION["tiny"], backends=["cuda"], directions=("inference",))
    assert [r["variant"] for r in rows] == ["peer: eager (reference)", "ours: cuda"], rows
    assert all(r["ms"] is not None and r["images_per_s"] > 0 for r in rows), rows
