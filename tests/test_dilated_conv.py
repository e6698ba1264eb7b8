"""channelwise_dilated_conv2d: parity of every backend with the float64 per-channel oracle,
gradients, determinism, registration, bad input, modules."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import ultron_kernels as uk
from ultron_kernels.nn import ChannelwiseDilatedConv2d, SplitDilatedConv2d
from ultron_kernels.ops.dilated_conv import normalize_dilation
from helpers import assert_parity, backend_cases, poisoned_outputs

CASES = backend_cases()
FUSED_CASES = backend_cases(include_reference=False)


def per_channel_conv(x, weight, bias, rates, stride):
    """The definition: output channel c = F.conv2d of channel c alone."""
    k = weight.shape[-1]
    weight = weight.reshape(-1, 1, k, k)
    return torch.cat([F.conv2d(x[:, c:c + 1], weight[c:c + 1], None if bias is None else bias[c:c + 1],
                               stride, d * (k - 1) // 2, d) for c, d in enumerate(rates)], 1)


def _double(t, grad=False):
    return None if t is None else t.detach().double().requires_grad_(grad)


def oracle(x, weight, bias, rates, stride):
    return per_channel_conv(_double(x), _double(weight), _double(bias), rates, stride)


def oracle_grads(x, weight, bias, rates, stride, grad_out):
    leaves = [_double(t, True) for t in (x, weight, bias)]
    out = per_channel_conv(*leaves, rates, stride)
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.double())


def make_inputs(shape, k, dtype, device, channels_last, bias=True, weight_4d=True):
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, device=device, dtype=dtype) / k
    if not weight_4d:
        weight = weight.reshape(c, k, k)
    bias_t = torch.randn(c, device=device, dtype=dtype) if bias else None
    return x, weight, bias_t


def check_case(device, backend, shape, k, dilation, stride, dtype, channels_last, bias=True,
               backward=True):
    x, weight, b = make_inputs(shape, k, dtype, device, channels_last, bias)
    rates = normalize_dilation(dilation, shape[1])
    leaves = [t.requires_grad_() for t in (x, weight, b) if t is not None] if backward else []
    with poisoned_outputs():
        y = uk.channelwise_dilated_conv2d(x, weight, b, dilation, stride, backend=backend)
    expected = oracle(x, weight, b, rates, stride)
    assert y.dtype == dtype
    if channels_last and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_parity("y", y, expected, dtype)
    if not backward:
        return
    grad_out = torch.randn_like(expected).to(dtype)
    with poisoned_outputs():
        grads = torch.autograd.grad(y, leaves, grad_out.to(device))
    for name, got, want in zip(("grad_x", "grad_weight", "grad_bias"), grads,
                               oracle_grads(x, weight, b, rates, stride, grad_out)):
        assert_parity(name, got, want, dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("k,dilation,stride,shape", [
    (3, (1, 3, 6), 1, (2, 6, 9, 11)),
    (3, 2, 2, (2, 4, 7, 5)),
    (5, [1, 2, 3, 4, 5, 8], 1, (1, 6, 10, 9)),
    (7, (2, 8), 2, (1, 4, 13, 12)),
    (1, (1, 4), 1, (2, 4, 5, 7)),
    (3, 8, 1, (1, 3, 5, 7)),       # dilated kernel far larger than the image
    (3, (1, 3), 1, (1, 2, 1, 1)),  # 1x1 image
    (3, (1, 3, 6), 1, (1, 3, 70, 45)),  # several tiles per plane, partial ones at the edges
    (5, (2, 20), 2, (1, 2, 37, 41)),    # halo too large for a shared-memory tile
])
def test_parity_float32(device, backend, channels_last, k, dilation, stride, shape):
    check_case(device, backend, shape, k, dilation, stride, torch.float32, channels_last)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_parity_half(device, backend, dtype, channels_last):
    check_case(device, backend, (2, 16, 11, 9), 3, (1, 3, 6, 2), 1, dtype, channels_last)


@pytest.mark.parametrize("device,backend", backend_cases(include_reference=False, devices=("cuda",)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_many_rows_and_planes(device, backend, channels_last):
    """GPU-sized input: the CUDA channels_last blocks loop over several rows each (weights
    staged once per block), NCHW planes span several shared-memory tiles."""
    check_case(device, backend, (16, 48, 61, 67), 3, (1, 3, 6), 1, torch.bfloat16, channels_last)


@pytest.mark.parametrize("device,backend", CASES)
def test_per_channel_tensor_dilation_no_bias(device, backend):
    dilation = torch.tensor([1, 5, 2, 8, 3])
    check_case(device, backend, (1, 5, 12, 10), 3, dilation, 1, torch.float32, False, bias=False)


@pytest.mark.parametrize("device,backend", CASES)
def test_large_kernel(device, backend):
    check_case(device, backend, (1, 2, 9, 8), 15, (1, 2), 1, torch.float32, True, backward=False)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(device, backend):
    x = torch.randn(0, 4, 5, 5, device=device)
    y = uk.channelwise_dilated_conv2d(x, torch.randn(4, 3, 3, device=device), None, 2, backend=backend)
    assert y.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("device,backend", CASES)
@given(b=st.integers(1, 2), groups=st.integers(1, 3), per_group=st.integers(1, 4),
       h=st.integers(1, 12), w=st.integers(1, 12), k=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]), channels_last=st.booleans(), data=st.data())
def test_random_shapes(device, backend, b, groups, per_group, h, w, k, stride, channels_last, data):
    rates = tuple(data.draw(st.lists(st.integers(1, 8), min_size=groups, max_size=groups)))
    check_case(device, backend, (b, groups * per_group, h, w), k, rates, stride, torch.float32,
               channels_last)


def test_gradcheck_reference_float64():
    x, weight, b = make_inputs((1, 4, 6, 5), 3, torch.float64, "cpu", False)
    inputs = tuple(t.requires_grad_() for t in (x, weight, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: uk.channelwise_dilated_conv2d(x, w, b, (1, 3), 2, backend="reference"), inputs)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_backward_is_bitwise_deterministic(device, backend):
    x, weight, b = make_inputs((2, 8, 13, 11), 3, torch.float32, device, True)
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    y = uk.channelwise_dilated_conv2d(x, weight, b, (1, 3), 1, backend=backend)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, g, retain_graph=True)
    second = torch.autograd.grad(y, leaves, g)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    x, weight, b = make_inputs((1, 4, 7, 6), 3, torch.float32, device, False)
    conv = torch.compile(
        lambda x, w, b: uk.channelwise_dilated_conv2d(x, w, b, (1, 2), 1, backend=backend).relu(),
        fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = conv(*leaves)
        out.sum().backward()
    dynamo = [str(w.message) for w in caught if "ynamo" in str(w.message)]
    assert not dynamo, dynamo  # e.g. a functools.lru_cache on the traced path
    expected = oracle(x, weight, b, (1, 1, 2, 2), 1).relu()
    assert_parity("compiled y", out, expected, torch.float32)
    assert x.grad is not None and weight.grad is not None and b.grad is not None


@pytest.mark.parametrize("device,backend", CASES)
def test_autocast(device, backend):
    x, weight, b = make_inputs((1, 4, 6, 6), 3, torch.float32, device, True)
    dtype = torch.bfloat16
    with torch.autocast(device_type=device, dtype=dtype):
        y = uk.channelwise_dilated_conv2d(x, weight, b, (1, 2), backend=backend)
    assert y.dtype == dtype
    assert_parity("autocast y", y, oracle(x.to(dtype), weight.to(dtype), b.to(dtype), (1, 1, 2, 2), 1), dtype)


def test_inputs_are_not_modified():
    x, weight, b = make_inputs((1, 4, 6, 6), 3, torch.float32, "cpu", False)
    copies = [t.clone() for t in (x, weight, b)]
    uk.channelwise_dilated_conv2d(x, weight, b, 2, backend="triton")
    assert all(torch.equal(a, c) for a, c in zip((x, weight, b), copies))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.randn(4, 5, 5)), ValueError, "x: expected a 4-D"),
    (dict(weight=torch.randn(3, 1, 3, 3)), ValueError, "weight: expected shape"),
    (dict(weight=torch.randn(4, 1, 2, 2)), ValueError, "K must be odd"),
    (dict(weight=torch.randn(4, 1, 3, 5)), ValueError, "weight: expected shape"),
    (dict(dilation=(1, 2, 3)), ValueError, "not divisible"),
    (dict(dilation=0), ValueError, r"dilation: every rate must be in \[1, "),
    (dict(dilation=torch.tensor([1, 2])), ValueError, "length C=4"),
    (dict(dilation=torch.tensor([1.0, 2, 3, 4])), TypeError, "integer dtype"),
    (dict(dilation=1.5), TypeError, "dilation must be"),
    (dict(stride=3), ValueError, "stride must be 1 or 2, got 3"),
    (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(4,\)"),
    (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(backend="cuda-graph"), ValueError, "backend must be one of"),
    (dict(x=torch.randn(1, 4, 5, 5, dtype=torch.float64),
          weight=torch.randn(4, 3, 3, dtype=torch.float64), backend="triton"),
     uk.BackendUnavailableError, "float64 runs on the reference backend only"),
])
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(4, 1, 3, 3), bias=None,
                dilation=(1, 2), stride=1, backend="auto")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        uk.channelwise_dilated_conv2d(args.pop("x"), args.pop("weight"), args.pop("bias"),
                                      args.pop("dilation"), args.pop("stride"), **args)


def test_cuda_backend_on_cpu_tensors_says_why(monkeypatch):
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM", "0")
    with pytest.raises(uk.BackendUnavailableError, match="ULTRON_KERNELS_CUDA_SIM=1"):
        uk.channelwise_dilated_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 3, 3), backend="cuda")


@pytest.mark.parametrize("device,backend", CASES)
def test_module_from_split_convs_matches_split_cat(device, backend):
    split = SplitDilatedConv2d(12, 3, (1, 3, 6)).to(device)
    fused = ChannelwiseDilatedConv2d.from_split_convs(list(split.convs), backend=backend)
    assert fused.dilation == (1,) * 4 + (3,) * 4 + (6,) * 4
    assert "0-3:1, 4-7:3, 8-11:6" in repr(fused)
    x = torch.randn(2, 12, 9, 10, device=device)
    with torch.no_grad():
        assert_parity("module", fused(x), split.double()(x.double()), torch.float32)


def test_from_split_convs_rejects_non_same_padding():
    convs = [torch.nn.Conv2d(4, 4, 3, padding=0, dilation=2, groups=4)]
    with pytest.raises(ValueError, match="same"):
        ChannelwiseDilatedConv2d.from_split_convs(convs)


def test_swap_in_replaces_split_convs_and_loads_their_checkpoint():
    model = torch.nn.Sequential(torch.nn.Identity(), SplitDilatedConv2d(12, 3, (1, 3, 6)))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 12, 9, 9)
    with torch.no_grad():
        expected = model(x)
    report = uk.swap_in(model, "reference")
    assert isinstance(model[1], ChannelwiseDilatedConv2d)
    assert report.swapped == [("1", "ultron_kernels SplitDilatedConv2d",
                               "split + conv + cat -> ChannelwiseDilatedConv2d[reference]")]
    with torch.no_grad():
        model[1].weight.zero_()
    model.load_state_dict(saved)  # the split keys load into the fused module
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
