"""window_attention's options for the models people run: a per-head scale tensor, cosine
attention (qk_norm), padded keys that take per-head vectors (pad_kv) and timm's
roll-then-pad order. Parity of every backend with the float64 reference (forward and every
gradient, scale and pad vectors included), gradcheck of the reference, opcheck,
torch.compile, determinism and bad input."""

from __future__ import annotations

import re

import pytest
import torch

import ultron_kernels as uk
from ultron_kernels.ops.window_attention import _fused_forward, fused_shape_reason
from ultron_kernels.reference.window_attention import window_attention_reference
from helpers import assert_parity, assert_parity_or_as_conditioned, backend_cases, poisoned_outputs

CASES = backend_cases()


# Inputs drawn fresh per test but the same in every run (conftest.py): the scale gradient is
# a sum with heavy cancellation, and a draw that brings it near zero makes its relative error a
# measure of that draw (the oracle below already takes the kernels' own saved logsumexp into
# account).
pytestmark = pytest.mark.usefixtures("seeded_per_test")
FUSED_CASES = backend_cases(include_reference=False)
ORDERS = {False: "pad_then_roll", True: "roll_then_pad"}


def make_leaves(shape, window, dtype, device, qk_norm=True, pad=True, bias=True):
    """q, k, v (packed views), scale, [k_pad, v_pad], [table]: fresh random leaves. The scale
    is Swin V2-sized (exp(log 10)..) so that cosine scores are not all alike."""
    b, h, w, heads, head_dim = shape
    qkv = torch.randn(b, h, w, 3, heads, head_dim, device=device, dtype=dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32   # scale and table
    scale = torch.rand(heads, device=device, dtype=wide)
    leaves = {"q": qkv[:, :, :, 0], "k": qkv[:, :, :, 1], "v": qkv[:, :, :, 2],
              "scale": scale * 10 + 2 if qk_norm else scale * 0.5 + 0.1}
    if pad:
        leaves["k_pad"] = torch.randn(heads, head_dim, device=device, dtype=dtype)
        leaves["v_pad"] = torch.randn(heads, head_dim, device=device, dtype=dtype)
    if bias:
        leaves["table"] = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, device=device,
                                      dtype=wide)
    return {name: t.detach().requires_grad_() for name, t in leaves.items()}


def call(fn, leaves, window, shift, qk_norm, roll_first, **kwargs):
    pads = (leaves["k_pad"], leaves["v_pad"]) if "k_pad" in leaves else None
    if fn is window_attention_reference:
        return fn(leaves["q"], leaves["k"], leaves["v"], window, shift, leaves.get("table"),
                  leaves["scale"], qk_norm, pads, roll_first, **kwargs)
    return fn(leaves["q"], leaves["k"], leaves["v"], window, shift, leaves.get("table"),
              leaves["scale"], qk_norm=qk_norm, pad_kv=pads, shift_order=ORDERS[roll_first], **kwargs)


def check_variant(device, backend, shape, window, shift, dtype, qk_norm, pad, roll_first, bias=True):
    leaves = make_leaves(shape, window, dtype, device, qk_norm, pad, bias)
    reason = fused_shape_reason(backend, window, shape[-1], torch.device(device), extras=True)
    if reason is not None:  # a backend that cannot run the window names its limit
        with pytest.raises(uk.BackendUnavailableError, match=re.escape(reason)):
            call(uk.window_attention, leaves, window, shift, qk_norm, roll_first, backend=backend)
        return
    # q, k, v stay views of one packed tensor (as a qkv projection gives them)
    packed = torch.stack([leaves[n] for n in "qkv"], 3)
    inputs = dict(leaves, q=packed[:, :, :, 0], k=packed[:, :, :, 1], v=packed[:, :, :, 2])
    with poisoned_outputs():
        out = call(uk.window_attention, inputs, window, shift, qk_norm, roll_first, backend=backend)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    expected, lse = call(window_attention_reference, ref_leaves, window, shift, qk_norm, roll_first,
                         return_lse=True)
    assert_parity("out", out, expected, dtype)
    # The same incoming gradient for both: rounded to dtype first.
    grad_out = torch.randn_like(expected).to(dtype).double()
    with poisoned_outputs():
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device=device, dtype=dtype))
    saved_lse = None
    if backend != "reference":  # the logsumexp the backward recomputes P from (deterministic)
        pads = (inputs["k_pad"], inputs["v_pad"]) if pad else (None, None)
        _, saved_lse = _fused_forward(*(inputs[n].detach() for n in "qkv"), leaves["table"].detach(), 1,
                                      list(window), list(shift), leaves["scale"].detach().float(), 0.0,
                                      qk_norm, *(t.detach() if t is not None else None for t in pads),
                                      roll_first, backend)
    ref_grads = torch.autograd.grad(oracle_loss(expected, lse, grad_out, saved_lse),
                                    list(ref_leaves.values()))
    eager = {}

    def eager_grad(name):  # the reference on the same inputs, in plain PyTorch
        if not eager:
            same = {n: t.detach().requires_grad_() for n, t in leaves.items()}
            result = call(window_attention_reference, same, window, shift, qk_norm, roll_first)
            eager.update(zip(same, torch.autograd.grad(result, list(same.values()), grad_out.to(dtype))))
        return eager[name]

    for name, got, want in zip(leaves, grads, ref_grads):
        assert got.dtype == leaves[name].dtype, name
        assert_parity_or_as_conditioned(f"d{name}", got, want, dtype, lambda: eager_grad(name))


def oracle_loss(expected, lse, grad_out, saved_lse=None):
    """A loss whose float64 gradients are exactly what the backward computes from its own
    inputs: its P is exp(S - saved_lse), every term of row i the exact one times
    f_i = exp(lse_i - saved_lse_i), as if dO_i were scaled by f_i; and its softmax term is
    its own sum_j P_ij dP_ij, which the scaled P makes f_i times the exact one. dS then gains
    p_ij (delta_i - delta'_i): the gradient of sum_i (delta_i - delta'_i) lse_i. The scale
    gradient needs this: it sums dS_ij C_ij over every pair with cancellation (each row of dS
    sums to 0), so the saved logsumexp's rounding shows there beyond the dtype's tolerance."""
    f = torch.ones_like(lse)
    if saved_lse is not None:
        f = torch.where(torch.isfinite(lse), (lse - saved_lse.double()).detach().exp(), 1.0)
    grad_out = grad_out * f[..., None]
    delta_exact = (grad_out * expected).sum(-1)
    delta_kernel = delta_exact * f
    return (expected * grad_out).sum() + ((delta_exact - delta_kernel).detach() * lse).sum()


VARIANTS = [  # shape (B, H, W, heads, D), window, shift, qk_norm, pad, roll_first
    ((2, 9, 11, 2, 16), (4, 4), (2, 1), True, True, False),     # torchvision V2, padded grid
    ((1, 10, 13, 2, 32), (4, 6), (2, 3), True, True, True),     # timm V2 order, rectangular
    ((1, 9, 7, 1, 16), (7, 7), (3, 3), False, True, True),      # timm V1 on a padded grid
    ((2, 10, 9, 2, 16), (4, 4), (2, 2), False, True, False),    # torchvision V1 on a padded grid
    ((1, 8, 8, 2, 16), (4, 4), (2, 2), True, False, False),     # divisible: no padding at all
    ((1, 18, 11, 1, 32), (9, 9), (4, 4), True, True, True),     # 81 tokens: several key blocks
    ((1, 15, 19, 2, 16), (13, 17), (6, 8), True, True, True),   # 221 tokens: 4 blocks, padded
]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape,window,shift,qk_norm,pad,roll_first", VARIANTS,
                         ids=lambda v: str(v).replace(" ", ""))
def test_variant_parity_float32(device, backend, shape, window, shift, qk_norm, pad, roll_first):
    check_variant(device, backend, shape, window, shift, torch.float32, qk_norm, pad, roll_first)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,window,shift,qk_norm,pad,roll_first", [VARIANTS[0], VARIANTS[1], VARIANTS[5]],
                         ids=lambda v: str(v).replace(" ", ""))
def test_variant_parity_half(device, backend, dtype, shape, window, shift, qk_norm, pad, roll_first):
    check_variant(device, backend, shape, window, shift, dtype, qk_norm, pad, roll_first)


@pytest.mark.parametrize("device,backend", [c for c in FUSED_CASES if c.values[1] == "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_streamed_variant_parity_half(device, backend, dtype):
    """The CUDA kernels' streamed tiles (221 tokens: as one tile, the backward needs 853 KB of
    shared memory) with every option, in 16-bit: the SIMT kernels read 16-bit rows into
    float tiles. (float32 runs in test_variant_parity_float32.)"""
    check_variant(device, backend, *VARIANTS[6][:3], dtype, *VARIANTS[6][3:])


@pytest.mark.parametrize("device,backend", FUSED_CASES)
@pytest.mark.parametrize("window,grid", [((4, 4), (9, 11)), ((9, 9), (11, 10))], ids=["one-block", "several-blocks"])
def test_half_gradients_without_saved_output(device, backend, window, grid):
    """The backward sums the softmax term delta_i = sum_j P_ij dP_ij in fp32 from its own
    tiles instead of dO_i . O_i with the saved 16-bit output, whose rounding went into the
    scale gradient's cancelling sum (3x and 10x eager bf16's error in 2 of 40 draws of Swin
    V2's options). On fresh bf16 draws, against the exact float64 gradients (no model of the
    kernel's roundings), every gradient is within the tolerances or twice eager's error.
    (9 x 9: several Triton blocks; the CUDA tensor-core path.)"""
    for draw in range(6 if window == (4, 4) else 3):
        leaves = make_leaves((1, *grid, 2, 16), window, torch.bfloat16, device)
        out = call(uk.window_attention, leaves, window, (2, 1), True, True, backend=backend)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
        exact = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
        expected = call(window_attention_reference, exact, window, (2, 1), True, True)
        want = torch.autograd.grad(expected, list(exact.values()), grad_out.double())
        same = {n: t.detach().requires_grad_() for n, t in leaves.items()}
        eager = torch.autograd.grad(call(window_attention_reference, same, window, (2, 1), True, True),
                                    list(same.values()), grad_out)
        for name, got, wanted, own in zip(leaves, grads, want, eager):
            assert_parity_or_as_conditioned(f"draw {draw} d{name}", got, wanted, torch.bfloat16,
                                            lambda: own)


@pytest.mark.parametrize("device,backend", CASES)
def test_zero_query_and_key_rows(device, backend):
    """Rows of norm 0 (below F.normalize's eps): the clamp cuts the norm's derivative off."""
    leaves = make_leaves((1, 6, 6, 1, 16), (3, 3), torch.float32, device)
    with torch.no_grad():
        leaves["q"][0, 1, 2] = 0
        leaves["k"][0, 4, 4] = 0
        leaves["k_pad"].zero_()   # Swin V2's zero k-bias: every padded key has norm 0
    out = call(uk.window_attention, leaves, (3, 3), (1, 1), True, False, backend=backend)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    expected = call(window_attention_reference, ref_leaves, (3, 3), (1, 1), True, False)
    assert_parity("out", out, expected, torch.float32)
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    ref_grads = torch.autograd.grad(expected.sum(), list(ref_leaves.values()))
    for name, got, want in zip(leaves, grads, ref_grads):
        assert_parity(f"d{name}", got, want, torch.float32)


def test_reference_gradcheck():
    """The reference's own gradients (every input, the options included) in float64."""
    leaves = make_leaves((1, 5, 6, 2, 4), (3, 3), torch.float64, "cpu")
    names = list(leaves)

    def fn(*tensors):
        return call(window_attention_reference, dict(zip(names, tensors)), (3, 3), (1, 2), True, True)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_scale_and_pad_gradients_are_bitwise_deterministic(device, backend):
    leaves = make_leaves((3, 11, 9, 2, 16), (4, 4), torch.float32, device)
    out = call(uk.window_attention, leaves, (4, 4), (2, 2), True, True, backend=backend)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, list(leaves.values()), g, retain_graph=True)
    second = torch.autograd.grad(out, list(leaves.values()), g)
    for name, a, b in zip(leaves, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_opcheck(device, backend):
    for qk_norm, pad, roll_first in ((True, True, True), (False, True, False), (True, False, False)):
        leaves = make_leaves((1, 7, 6, 2, 16), (4, 4), torch.float32, device, qk_norm, pad)
        q, k, v = (leaves[n].detach().contiguous().requires_grad_() for n in "qkv")
        pads = (leaves["k_pad"], leaves["v_pad"]) if pad else (None, None)
        torch.library.opcheck(_fused_forward, (q, k, v, leaves["table"], 1, [4, 4], [2, 1], leaves["scale"],
                                               0.0, qk_norm, *pads, roll_first, backend))


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    leaves = make_leaves((1, 7, 9, 2, 16), (4, 4), torch.float32, device)

    def fn(leaves):
        return call(uk.window_attention, leaves, (4, 4), (2, 2), True, True, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(leaves)
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    expected = fn(leaves)
    ref_grads = torch.autograd.grad(expected.sum(), list(leaves.values()))
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(leaves, grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), name


def test_inputs_are_not_modified():
    leaves = make_leaves((1, 7, 9, 2, 16), (4, 4), torch.float32, "cpu")
    before = {n: t.detach().clone() for n, t in leaves.items()}
    out = call(uk.window_attention, leaves, (4, 4), (2, 2), True, True, backend="reference")
    out.sum().backward()
    for name, t in leaves.items():
        assert torch.equal(t.detach(), before[name]), name


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scale=torch.ones(3)), ValueError, r"scale: a tensor scale must have shape \(heads,\) = \(2,\)"),
    (dict(scale=torch.ones(2, dtype=torch.int32)), TypeError, "scale: dtype must be floating"),
    (dict(scale=torch.ones(2, device="meta")), ValueError, "scale is on meta"),
    (dict(scale="0.1"), TypeError, "scale must be a float, a"),
    (dict(qk_norm=1), TypeError, "qk_norm must be a bool, got 1"),
    (dict(pad_kv=torch.zeros(2, 16)), TypeError, "pad_kv must be None or a pair"),
    (dict(pad_kv=(torch.zeros(2, 16), torch.zeros(2, 8))), ValueError,
     r"pad_kv\[1\] \(v_pad\): expected shape \(heads, head_dim\) = \(2, 16\), got \(2, 8\)"),
    (dict(pad_kv=(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16))), TypeError,
     r"pad_kv\[0\] \(k_pad\): dtype must be floating"),
    (dict(pad_kv=(torch.zeros(2, 16), None)), TypeError, r"pad_kv\[1\] \(v_pad\) must be a torch.Tensor"),
    (dict(shift_order="roll"), ValueError, "shift_order must be one of"),
])
def test_bad_options(kwargs, error, match):
    q = torch.randn(1, 8, 8, 2, 16)
    with pytest.raises(error, match=match):
        uk.window_attention(q, q, q, 4, 2, **kwargs)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
@pytest.mark.parametrize("shape,window,shift,qk_norm,pad,roll_first", [VARIANTS[0], VARIANTS[2]],
                         ids=lambda v: str(v).replace(" ", ""))
def test_saved_logsumexp(device, backend, shape, window, shift, qk_norm, pad, roll_first):
    """The forward's saved logsumexp (what the backward recomputes P from) per query."""
    leaves = make_leaves(shape, window, torch.float32, device, qk_norm, pad)
    pads = (leaves["k_pad"], leaves["v_pad"]) if pad else (None, None)
    q, k, v = (leaves[n].detach().contiguous() for n in "qkv")
    with poisoned_outputs():
        out, lse = _fused_forward(q, k, v, leaves["table"].detach(), 1, list(window), list(shift),
                                  leaves["scale"].detach(), 0.0, qk_norm, *pads, roll_first, backend)
    ref_leaves = {n: t.detach().double() for n, t in leaves.items()}
    expected, expected_lse = call(window_attention_reference, ref_leaves, window, shift, qk_norm,
                                  roll_first, return_lse=True)
    assert_parity("out", out, expected, torch.float32)
    assert_parity("lse", lse, expected_lse, torch.float32)
