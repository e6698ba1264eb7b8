"""grouped_depthwise_conv2d: parity of every backend with a float64 per-channel oracle (its
padding derived here, independently of the op), forward and every gradient; hypothesis sweeps
over random group lists; determinism; registration; bad input; the module."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import ultron_kernels as uk
from ultron_kernels import DepthwiseGroup as G
from ultron_kernels.nn import GroupedDepthwiseConv2d
from ultron_kernels.ops.grouped_depthwise_conv import _fused_forward, pack_weights, resolve_groups
from helpers import assert_parity, backend_cases, poisoned_outputs

CASES = backend_cases()
FUSED_CASES = backend_cases(include_reference=False)
pytestmark = pytest.mark.usefixtures("seeded_per_test")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _axis_pads(mode, size, k, d, stride):
    """(before, after) on one axis: the definitions, written out again for the oracle."""
    if mode == "same":
        total = d * (k - 1)
    elif mode == "tf_same":  # timm get_same_padding
        total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * d + 1 - size, 0)
    else:
        raise AssertionError(mode)
    return total // 2, total - total // 2


def oracle(x, weights, biases, groups, stride):
    """Output channel by channel in float64: F.pad, then a one-channel F.conv2d."""
    x = x.double()
    height, width = x.shape[2:]
    out, c = [], 0
    for g, w, b in zip(groups, weights, biases):
        for i in range(g.channels):
            plane = x[:, c + i:c + i + 1]
            if g.kernel_size is None:
                out.append(plane)
                continue
            (kh, kw), (dh, dw) = _pair(g.kernel_size), _pair(g.dilation)
            if isinstance(g.padding, str):
                pads = _axis_pads(g.padding, height, kh, dh, stride) + _axis_pads(g.padding, width, kw, dw, stride)
            else:
                p = (g.padding,) if isinstance(g.padding, int) else tuple(g.padding)
                pads = p * 4 if len(p) == 1 else (p[0], p[0], p[1], p[1]) if len(p) == 2 else p
            padded = F.pad(plane, (pads[2], pads[3], pads[0], pads[1]))
            out.append(F.conv2d(padded, w[i:i + 1].double(), None if b is None else b[i:i + 1].double(),
                                stride, 0, (dh, dw)))
        c += g.channels
    return torch.cat(out, 1)


def make_inputs(groups, shape, dtype, channels_last, bias=True):
    batch, height, width = shape
    channels = sum(g.channels for g in groups)
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weights = [None if g.kernel_size is None else
               (torch.randn(g.channels, 1, *_pair(g.kernel_size)) / math.prod(_pair(g.kernel_size)) ** 0.5).to(dtype)
               for g in groups]
    biases = [None if g.kernel_size is None or not bias else torch.randn(g.channels, dtype=dtype) for g in groups]
    return x, weights, biases


def check_case(backend, groups, shape, stride, dtype, channels_last, bias=True):
    x, weights, biases = make_inputs(groups, shape, dtype, channels_last, bias)
    leaves = [t.requires_grad_() for t in [x, *weights, *biases] if t is not None]
    with poisoned_outputs():
        y = uk.grouped_depthwise_conv2d(x, weights, groups, biases, stride, backend=backend)
    expected = oracle(x, weights, biases, groups, stride)
    assert y.dtype == dtype
    if channels_last and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_parity("y", y, expected, dtype)
    grad_out = torch.randn_like(expected).to(dtype)  # the oracle takes the same (rounded) values
    with poisoned_outputs():
        grads = torch.autograd.grad(y, leaves, grad_out)
    double_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(double_leaves)
    dx = next(it)
    dws = [None if w is None else next(it) for w in weights]
    dbs = [None if b is None else next(it) for b in biases]
    want = torch.autograd.grad(oracle(dx, dws, dbs, groups, stride), double_leaves, grad_out.double())
    for index, (got, expect) in enumerate(zip(grads, want)):
        assert_parity(f"grad {index}", got, expect, dtype)


# MixNet (unequal splits, remainder in group 0), InceptionNeXt (identity, square, bands), CoaT
# (explicit padding), even kernels, per-axis dilation, asymmetric explicit padding, a kernel
# larger than the image, the largest band.
GROUP_LISTS = {
    "mixnet": [G(6, 3), G(5, 5), G(5, 7), G(5, 9)],
    "mixnet-tf": [G(6, 3, padding="tf_same"), G(5, 5, padding="tf_same"), G(5, 7, padding="tf_same")],
    "inception": [G.identity(7), G(3, 3, padding=1), G(3, (1, 11), padding=(0, 5)), G(3, (11, 1), padding=(5, 0))],
    "coat": [G(4, 3, padding=1), G(6, 5, padding=2), G(6, 7, padding=3)],
    "even-tf": [G(3, (2, 4), padding="tf_same"), G(5, 4, dilation=(1, 2), padding="tf_same"), G(2, 1, padding="tf_same")],
    "dilated": [G(4, 3, dilation=(2, 3)), G(4, 5, dilation=2), G(3, (3, 1), dilation=(4, 1))],
    "explicit": [G(5, (3, 2), padding=(2, 0, 1, 0)), G(3, (2, 3), padding=(1, 0, 2, 0))],
    "band31": [G(3, (31, 1)), G(2, (1, 3))],
}
STRIDE_2 = ("mixnet", "mixnet-tf", "even-tf", "dilated", "band31")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name,stride", [(n, 1) for n in GROUP_LISTS] + [(n, 2) for n in STRIDE_2])
def test_parity_fp32(device, backend, channels_last, name, stride):
    groups = GROUP_LISTS[name]
    if name == "explicit":  # its explicit padding gives equal outputs at stride 1 only
        assert stride == 1
    check_case(backend, groups, (1, 11, 9), stride, torch.float32, channels_last)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,stride,channels_last", [("mixnet-tf", 2, True), ("inception", 1, False),
                                                       ("even-tf", 2, False), ("coat", 1, True)])
def test_parity_16_bit(device, backend, dtype, name, stride, channels_last):
    check_case(backend, GROUP_LISTS[name], (1, 15, 9), stride, dtype, channels_last)


# Large kernels: RepLKNet's 31x31 and UniRepLKNet's 13x13 (Triton's banded tensor-core
# kernels in 16-bit at stride 1, over partial 32x32 tiles; CUDA's large-kernel grad weight in
# NCHW), a mix with an identity group, a row-dilated 9x9 and an asymmetric 11x9, a 9x11
# dilated on both axes (a band 31 columns wide), VAN's 7x7 with dilation 3 (gather path), a
# 15x15 at stride 2 and a 13x13 in fp32 (gather path: in the interpreter every tap is a load,
# so these stay small).
LARGE_KERNELS = {
    "replk31": ([G(3, 31, padding="same")], (1, 33, 34), 1, False),
    "unireplk13": ([G(8, 13, padding="same")], (2, 17, 40), 1, True),
    "large-mix": ([G.identity(2), G(5, 9, dilation=(3, 1), padding="same"), G(3, (11, 9), padding=(3, 7, 6, 2))],
                  (1, 19, 23), 1, False),
    "large-dilated": ([G(6, (9, 11), dilation=(2, 3), padding="same")], (1, 18, 37), 1, True),
    "van-lka": ([G(6, 7, dilation=3, padding=9)], (1, 23, 21), 1, False),
    "large-s2": ([G(4, 15, padding="tf_same")], (1, 20, 18), 2, True),
}
GATHER_PATH = ("van-lka", "large-s2")


@pytest.mark.parametrize("device,backend", FUSED_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LARGE_KERNELS))
def test_large_kernels_16_bit(device, backend, dtype, name, monkeypatch):
    groups, shape, stride, channels_last = LARGE_KERNELS[name]
    if dtype == torch.float16 and name in GATHER_PATH:
        pytest.skip("the gather path's 16-bit types are covered by the other tests; bf16 is enough here")
    banded = []
    if backend == "triton":
        from ultron_kernels.triton import grouped_depthwise_conv as conv
        launch = conv.band_launch
        monkeypatch.setattr(conv, "band_launch", lambda *args, **kw: banded.append(1) or launch(*args, **kw))
    check_case(backend, groups, shape, stride, dtype, channels_last)
    if backend == "triton":  # forward and grad input; the large ones only
        assert len(banded) == (0 if name in GATHER_PATH else 2)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_large_kernel_fp32_and_deterministic_banded_backward(device, backend):
    check_case(backend, [G(3, 13, padding="same")], (1, 12, 11), 1, torch.float32, True)
    groups, shape, _, _ = LARGE_KERNELS["replk31"]
    x, weights, biases = make_inputs(groups, shape, torch.bfloat16, False)
    leaves = [t.requires_grad_() for t in [x, *weights, *biases]]
    y = uk.grouped_depthwise_conv2d(x, weights, groups, biases, backend=backend)
    grad_out = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(y, leaves, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device,backend", CASES)
def test_image_smaller_than_the_dilated_kernel(device, backend):
    groups = [G(3, 7, dilation=2), G(2, (5, 9), padding="tf_same"), G.identity(3)]
    check_case(backend, groups, (1, 3, 2), 1, torch.float32, False)
    check_case(backend, groups[:2], (1, 3, 2), 2, torch.float32, True)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5), (1, 8, 3, 0)])
def test_empty_input_gives_the_empty_result_and_zero_gradients(device, backend, shape):
    groups = [G.identity(2), G(3, 3), G(3, (1, 5), padding="tf_same")]
    x = torch.randn(shape, requires_grad=True)
    weights = [None, torch.randn(3, 1, 3, 3, requires_grad=True), torch.randn(3, 1, 1, 5, requires_grad=True)]
    bias = [None, torch.randn(3, requires_grad=True), None]
    y = uk.grouped_depthwise_conv2d(x, weights, groups, bias, backend=backend)
    assert tuple(y.shape) == shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert weights[1].grad.abs().sum() == 0 and weights[2].grad.abs().sum() == 0 and bias[1].grad.abs().sum() == 0


@pytest.mark.parametrize("device,backend", CASES)
def test_float64_and_no_bias(device, backend):
    if backend != "reference":
        pytest.skip("float64 runs on the reference backend only")
    check_case(backend, GROUP_LISTS["inception"], (2, 9, 10), 1, torch.float64, True, bias=False)


def _group_lists(draw_kernel_max=9):
    kernel = st.integers(1, draw_kernel_max)
    padding = st.sampled_from(["same", "tf_same"])
    conv = st.builds(lambda c, kh, kw, dh, dw, p: G(c, (kh, kw), (dh, dw), p),
                     st.integers(1, 6), kernel, kernel, st.integers(1, 3), st.integers(1, 3), padding)
    return st.lists(st.one_of(conv, st.builds(G.identity, st.integers(1, 4))), min_size=1, max_size=4)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=_group_lists(), height=st.integers(1, 12), width=st.integers(1, 12), stride=st.sampled_from([1, 2]),
       channels_last=st.booleans())
def test_random_group_lists(device, backend, groups, height, width, stride, channels_last):
    if stride == 2:
        # Identity groups need stride 1; 'same' at stride 2 needs an even span (its own test).
        groups = [g for g in groups if g.kernel_size is not None and not (
            g.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(g.kernel_size, g.dilation)))]
        if not groups:
            return
    check_case(backend, groups, (1, height, width), stride, torch.float32, channels_last)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_backward_is_deterministic(device, backend):
    groups = GROUP_LISTS["mixnet"]
    x, weights, biases = make_inputs(groups, (1, 9, 11), torch.float32, True)
    leaves = [t.requires_grad_() for t in [x, *weights, *biases]]
    y = uk.grouped_depthwise_conv2d(x, weights, groups, biases, 2, backend=backend)
    grad_out = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(y, leaves, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_opcheck(device, backend):
    groups = resolve_groups(GROUP_LISTS["inception"], 6, 7, 1)
    x, weights, biases = make_inputs(GROUP_LISTS["inception"], (1, 6, 7), torch.float32, False)
    weight = pack_weights([w for w in weights if w is not None], x)
    bias = torch.randn(x.shape[1])
    spec = [v for g in groups for v in g]
    for args in ((x, weight, bias, spec, 1, backend),
                 (x.to(memory_format=torch.channels_last), weight, None, spec, 1, backend)):
        args = tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(_fused_forward, args)


@pytest.mark.parametrize("device,backend", CASES)
def test_module_compiles_fullgraph_and_runs_under_autocast(device, backend):
    module = GroupedDepthwiseConv2d(GROUP_LISTS["inception"], backend=backend)
    x = torch.randn(2, 16, 7, 6, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    assert not [w for w in caught if "graph break" in str(w.message).lower()]
    torch.testing.assert_close(out, module(x))
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x).dtype == torch.bfloat16


def test_meta_tensors_give_the_output_shape():
    groups = GROUP_LISTS["mixnet-tf"]
    x = torch.empty(2, 16, 15, 9, device="meta")
    weights = [torch.empty(g.channels, 1, g.kernel_size, g.kernel_size, device="meta") for g in groups]
    for backend in ("reference", "triton"):
        y = uk.grouped_depthwise_conv2d(x, weights, groups, None, 2, backend=backend) if backend == "reference" \
            else _fused_forward(x, pack_weights(weights, x), None,
                                [v for g in resolve_groups(groups, 15, 9, 2) for v in g], 2, backend)
        assert y.shape == (2, 16, 8, 5) and y.device.type == "meta"


@pytest.mark.parametrize("device,backend", CASES)
def test_inputs_are_not_modified(device, backend):
    groups = GROUP_LISTS["inception"]
    x, weights, biases = make_inputs(groups, (1, 8, 9), torch.float32, True)
    before = [t.clone() for t in [x, *weights, *biases] if t is not None]
    uk.grouped_depthwise_conv2d(x, weights, groups, biases, backend=backend).sum()
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in [x, *weights, *biases] if t is not None]))


def _call(groups=None, weights=None, x=None, bias=None, stride=1):
    groups = groups if groups is not None else [G(2, 3), G(2, (1, 5))]
    x = x if x is not None else torch.randn(1, 4, 6, 6)
    if weights is None:
        weights = [torch.randn(g.channels, 1, *_pair(g.kernel_size)) if g.kernel_size else None for g in groups]
    return lambda backend: uk.grouped_depthwise_conv2d(x, weights, groups, bias, stride, backend=backend)


BAD_INPUTS = [
    ("channels sum", _call(groups=[G(2, 3), G(3, 3)]), ValueError, r"sum to 5, but x has C=4"),
    ("weight shape", _call(weights=[torch.randn(2, 1, 3, 3), torch.randn(2, 1, 5, 1)]), ValueError,
     r"weights\[1\]: expected shape \(2, 1, 1, 5\)"),
    ("kernel 0", _call(groups=[G(2, 0), G(2, 3)], weights=[torch.randn(2, 1, 1, 1)] * 2), ValueError,
     r"groups\[0\].kernel_size must be in \[1, 31\]"),
    ("kernel 32", _call(groups=[G(2, (1, 32)), G(2, 3)], weights=[torch.randn(2, 1, 1, 1)] * 2), ValueError,
     r"groups\[0\].kernel_size must be in \[1, 31\]"),
    ("dilation 0", _call(groups=[G(2, 3, dilation=0), G(2, 3)]), ValueError, r"groups\[0\].dilation"),
    ("negative padding", _call(groups=[G(2, 3, padding=(1, -1)), G(2, 3)]), ValueError,
     r"groups\[0\].padding must be >= 0"),
    ("unknown padding", _call(groups=[G(2, 3, padding="valid"), G(2, 3)]), ValueError, r"groups\[0\].padding"),
    ("stride 3", _call(stride=3), ValueError, r"stride must be 1 or 2, got 3"),
    ("same at stride 2", _call(groups=[G(2, 2), G(2, 3)], stride=2), ValueError,
     r"groups\[0\]: 'same' padding cannot be given by kernel 2"),
    ("identity at stride 2", _call(groups=[G.identity(2), G(2, 3)], stride=2), ValueError,
     r"identity group, which needs stride 1"),
    ("output sizes differ", _call(groups=[G(2, 3, padding=0), G(2, 3, padding=1)]), ValueError,
     r"same output size"),
    ("kernel beyond the image", _call(groups=[G(2, 9, padding=0), G(2, 9, padding=0)]), ValueError,
     r"smaller than its dilated kernel"),
    ("identity with a weight", _call(groups=[G.identity(2), G(2, 3)], weights=[torch.randn(2, 1, 1, 1),
                                                                             torch.randn(2, 1, 3, 3)]),
     ValueError, r"weights\[0\] must be None"),
    ("missing weight", _call(weights=[None, torch.randn(2, 1, 1, 5)]), ValueError, r"weights\[0\] is None"),
    ("weights not a list", _call(weights=torch.randn(4, 1, 3, 3)), TypeError, r"weights must be a sequence"),
    ("group type", _call(groups=[(2, 3), G(2, 3)], weights=[torch.randn(2, 1, 3, 3)] * 2), TypeError, r"groups\[0\] must be a DepthwiseGroup"),
    ("dtype mismatch", _call(weights=[torch.randn(2, 1, 3, 3).double(), torch.randn(2, 1, 1, 5)]), TypeError,
     r"weights\[0\] has dtype torch.float64"),
    ("bias shape", _call(bias=[torch.randn(3), None]), ValueError, r"bias\[0\]: expected shape \(2,\)"),
    ("x not 4-D", _call(x=torch.randn(4, 6, 6)), ValueError, r"x: expected a 4-D tensor"),
    ("int dtype", _call(x=torch.ones(1, 4, 6, 6, dtype=torch.int32),
                        weights=[torch.ones(2, 1, 3, 3, dtype=torch.int32), torch.ones(2, 1, 1, 5, dtype=torch.int32)]),
     TypeError, r"x: dtype must be"),
    # An integer x with float weights is x's error, not the weights' (the new-user trial).
    ("int x, float weights", _call(x=torch.ones(1, 4, 6, 6, dtype=torch.int64)), TypeError,
     r"x: dtype must be .* got torch.int64"),
]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("name,call,error,match", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_named_error(device, backend, name, call, error, match):
    with pytest.raises(error, match=match):
        call(backend=backend)


def test_module_from_convs_equals_split_convs_cat_and_keeps_weights():
    torch.manual_seed(0)
    convs = [nn.Conv2d(5, 5, 3, padding=1, groups=5), nn.Conv2d(4, 4, (1, 7), padding=(0, 3), groups=4),
             nn.Conv2d(4, 4, 5, padding="same", dilation=2, groups=4)]
    module = GroupedDepthwiseConv2d.from_convs([3, *convs])
    x = torch.randn(2, 16, 9, 8)
    chunks = x.split([3, 5, 4, 4], 1)
    expected = torch.cat([chunks[0]] + [conv(c) for conv, c in zip(convs, chunks[1:])], 1)
    torch.testing.assert_close(module(x), expected)
    assert [tuple(w.shape) for w in module.weights] == [tuple(c.weight.shape) for c in convs]
    copy = GroupedDepthwiseConv2d(module.groups)
    copy.load_state_dict(module.state_dict())
    torch.testing.assert_close(copy(x), expected)
    with pytest.raises(ValueError, match=r"part 0: not depthwise"):
        GroupedDepthwiseConv2d.from_convs([nn.Conv2d(4, 4, 3, padding=1)])
