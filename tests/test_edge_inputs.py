"""Edge inputs on which every backend must do the same, defined thing: large fp16 values,
empty tensors, integers too large for the kernels, meta tensors; and the messages a user
gets when a backend is chosen through the environment or Triton's interpreter was switched
on too late. Fully masked attention rows are in test_window_attention.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ultron_kernels as uk
from ultron_kernels.backends import select_backend
from ultron_kernels.nn import ChannelwiseDilatedConv2d, SplitDilatedConv2d, WindowAttention
from ultron_kernels.reference.window_attention import window_attention_reference
from helpers import assert_parity, backend_cases

CASES = backend_cases()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_from_the_environment_is_named_in_errors(monkeypatch):
    monkeypatch.setenv("ULTRON_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ULTRON_KERNELS_BACKEND must be one of .* got 'bogus'"):
        select_backend("window_attention", "auto", torch.device("cpu"), lambda b: None)
    monkeypatch.setenv("ULTRON_KERNELS_BACKEND", "cuda")
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM", "0")
    q = torch.randn(1, 4, 4, 1, 16)
    with pytest.raises(uk.BackendUnavailableError, match="ULTRON_KERNELS_BACKEND=cuda"):
        uk.window_attention(q, q, q, 4)


@pytest.mark.parametrize("device,backend", CASES)
def test_large_fp16_attention_stays_finite(device, backend):
    """Inputs x300: fp16 scores would overflow (300*300*16 > 65504); every backend keeps
    scores and softmax in fp32, as the kernels do."""
    q, k, v = ((300 * torch.randn(1, 8, 8, 2, 16, device=device)).half() for _ in range(3))
    out = uk.window_attention(q, k, v, 4, 2, None, backend=backend)
    expected = window_attention_reference(q.double(), k.double(), v.double(), (4, 4), (2, 2), None, 0.25)
    assert torch.isfinite(out).all()
    assert_parity("out", out, expected, torch.float16)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape,stride", [((2, 4, 0, 5), 1), ((2, 4, 5, 0), 2), ((0, 4, 5, 5), 1),
                                          ((1, 0, 5, 5), 2), ((1, 4, 0, 0), 2)])
def test_empty_conv_input_gives_the_empty_result(device, backend, shape, stride):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(shape[1], 3, 3, device=device, requires_grad=True)
    b = torch.randn(shape[1], device=device, requires_grad=True)
    y = uk.channelwise_dilated_conv2d(x, w, b, 2, stride, backend=backend)
    expected = (shape[0], shape[1], (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1)
    assert tuple(y.shape) == expected
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


@pytest.mark.parametrize("device,backend", CASES)
def test_integers_beyond_the_kernels_32_bits_are_value_errors(device, backend):
    x = torch.randn(1, 2, 5, 5, device=device)
    w = torch.randn(2, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"dilation: every rate must be in \[1, 1048575\]"):
        uk.channelwise_dilated_conv2d(x, w, None, 2**31, backend=backend)
    wide = torch.empty(0, 1, 2**31, 1, device=device)
    with pytest.raises(ValueError, match="every dimension must be < 2\\*\\*31"):
        uk.channelwise_dilated_conv2d(wide, torch.randn(1, 3, 3, device=device), None, 1, backend=backend)


def test_triton_interpret_set_after_triton_import_says_so():
    code = ("import os, triton, triton.language\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import ultron_kernels as uk\n"
            "print(uk.available_backends('cpu')['triton'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "set TRITON_INTERPRET=1 before triton is imported" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cuda"])
def test_meta_tensors_infer_shapes(backend):
    """Models built on torch.device("meta") run every op and module for shapes only."""
    x = torch.empty(2, 12, 9, 7, device="meta")
    y = uk.channelwise_dilated_conv2d(x, torch.empty(12, 3, 3, device="meta"), None, (1, 2, 3), 2,
                                      backend=backend)
    assert y.device.type == "meta" and tuple(y.shape) == (2, 12, 5, 4)
    q = torch.empty(2, 9, 7, 2, 16, device="meta")
    out = uk.window_attention(q, q, q, 4, 2, torch.empty(49, 2, device="meta"), backend=backend)
    assert out.device.type == "meta" and out.shape == q.shape
    with torch.device("meta"):
        conv = ChannelwiseDilatedConv2d(12, 3, (1, 2, 3), backend=backend)
        attn = WindowAttention(32, 2, window_size=4, shift_size=2, backend=backend)
    assert conv(x).shape == (2, 12, 9, 7)
    assert attn(torch.empty(1, 8, 9, 32, device="meta")).shape == (1, 8, 9, 32)


def test_swap_in_on_a_root_split_module_says_how():
    root = SplitDilatedConv2d(12, 3, (1, 3, 6))
    with pytest.raises(ValueError, match="from_split_convs"):
        uk.swap_in(root, "reference")


def test_swap_keeps_state_dict_keys_both_ways():
    torch.manual_seed(0)
    model = torch.nn.Sequential(SplitDilatedConv2d(12, 3, (1, 3, 6)), torch.nn.Conv2d(12, 4, 1))
    before = model.state_dict()
    uk.swap_in(model, "reference")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape and torch.equal(after[k], before[k]) for k in before)
    unfused = torch.nn.Sequential(SplitDilatedConv2d(12, 3, (1, 3, 6)), torch.nn.Conv2d(12, 4, 1))
    unfused.load_state_dict(after)  # a checkpoint saved after the swap loads into the original
    model.load_state_dict(unfused.state_dict())  # and back
    # Output, input gradient and every parameter gradient match the untouched model's.
    x = torch.randn(1, 12, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(1, 4, 8, 8)
    out, out_ref = model(x), unfused(x_ref)
    out.backward(grad)
    out_ref.backward(grad)
    assert torch.allclose(out, out_ref, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    fused = model[0]
    split_grads = {n: p.grad for n, p in unfused.named_parameters()}
    for name, chunk in zip(("weight", "bias"), (fused.weight.grad, fused.bias.grad)):
        expected = torch.cat([split_grads[f"0.convs.{i}.{name}"] for i in range(3)])
        assert torch.allclose(chunk, expected, atol=1e-5), name
    for name in ("weight", "bias"):
        assert torch.allclose(model[1].get_parameter(name).grad, split_grads[f"1.{name}"], atol=1e-5)
