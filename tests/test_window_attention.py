"""window_attention: parity of every backend with the float64 reference, gradients (bias
included), determinism, registration, bad input, the module, equality with timm's Swin."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import ultron_kernels as uk
from ultron_kernels.nn import WindowAttention
from ultron_kernels.ops.window_attention import _fused_forward, fused_shape_reason
from ultron_kernels.reference.window_attention import window_attention_reference
from helpers import assert_parity, backend_cases, poisoned_outputs

CASES = backend_cases()
FUSED_CASES = backend_cases(include_reference=False)


def make_inputs(shape, heads, head_dim, window, bias_kind, dtype, device, packed=True):
    """shape: (B, H, W) with a 2D window or (B, T, H, W) with a 3D one."""
    if packed:  # q, k, v as strided views of one (..., 3, heads, D) tensor
        qkv = torch.randn(*shape, 3, heads, head_dim, device=device, dtype=dtype)
        q, k, v = qkv.unbind(-3)
    else:
        q, k, v = (torch.randn(*shape, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    bias = None
    if bias_kind == "table":
        bias = torch.randn(math.prod(2 * w - 1 for w in window), heads, device=device, dtype=torch.float32)
    elif bias_kind == "dense":
        bias = torch.randn(heads, math.prod(window), math.prod(window), device=device, dtype=torch.float32)
    return q, k, v, bias


def check_case(device, backend, shape, heads, head_dim, window, shift, bias_kind, dtype,
               packed=True, backward=True):
    q, k, v, bias = make_inputs(shape, heads, head_dim, window, bias_kind, dtype, device, packed)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.requires_grad_())
    q_in, k_in, v_in = (leaves[:3] if not packed else
                        torch.stack(leaves[:3], -3).unbind(-3))  # keep the packed strides
    with poisoned_outputs():
        out = uk.window_attention(q_in, k_in, v_in, window, shift, bias, backend=backend)
    assert out.dtype == dtype and out.is_contiguous()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_bias = ref_leaves[3] if bias is not None else None
    expected = window_attention_reference(*ref_leaves[:3], window, shift, ref_bias,
                                          head_dim ** -0.5)
    assert_parity("out", out, expected, dtype)
    if not backward:
        return
    grad_out = torch.randn_like(expected)
    with poisoned_outputs():
        grads = torch.autograd.grad(out, leaves, grad_out.to(device=device, dtype=dtype))
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_parity(name, got, want, dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape,window,shift,bias_kind", [
    ((1, 7, 7, 2), (7, 7), (0, 0), "table"),
    ((2, 14, 14, 2), (7, 7), (3, 3), "table"),
    ((1, 9, 11, 2), (7, 7), (3, 2), "dense"),     # non-multiples: padding
    ((1, 5, 3, 1), (7, 7), (0, 0), "table"),      # smaller than one window
    ((1, 16, 8, 1), (8, 8), (4, 4), None),
    ((2, 10, 13, 2), (4, 6), (2, 3), "table"),    # rectangular window
    ((1, 12, 10, 1), (4, 6), (0, 3), "dense"),    # shift on one axis only
    ((1, 1, 1, 2), (8, 8), (0, 0), "table"),      # 1x1 grid
    ((1, 18, 20, 1), (9, 9), (4, 4), "table"),    # 81 tokens: two key blocks
], ids=lambda v: str(v).replace(" ", ""))
def test_parity_float32(device, backend, shape, window, shift, bias_kind):
    b, h, w, heads = shape
    check_case(device, backend, (b, h, w), heads, 16, window, shift, bias_kind, torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("head_dim", [12, 32, 40, 64, 80, 128])
def test_head_dims(device, backend, head_dim):
    """Every head dim up to 128: Triton's tiles are the next power of two (16 at least), the
    padding columns masked (12, 40 and SAM-H's 80); CUDA's any width."""
    check_case(device, backend, (1, 9, 8), 1, head_dim, (7, 7), (3, 3), "table", torch.float32,
               packed=head_dim != 64)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,window,shift,bias_kind,head_dim", [
    ((2, 14, 10, 2), (7, 7), (3, 3), "table", 32),
    ((1, 10, 13, 2), (4, 6), (2, 3), "dense", 16),
    ((1, 16, 8, 1), (8, 8), (0, 4), None, 64),
    ((1, 18, 11, 1), (9, 9), (4, 0), "table", 32),   # 81 tokens: two Triton blocks, 96-row wmma tiles
], ids=lambda v: str(v).replace(" ", ""))
def test_parity_half(device, backend, dtype, shape, window, shift, bias_kind, head_dim):
    b, h, w, heads = shape
    check_case(device, backend, (b, h, w), heads, head_dim, window, shift, bias_kind, dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape,window,shift,bias_kind,dtype", [
    ((1, 30, 20, 1), (13, 17), (6, 8), "table", torch.float32),   # 221 tokens: 4 blocks, last partial; padded
    ((1, 15, 19, 2), (13, 17), (0, 8), "dense", torch.bfloat16),
    ((1, 24, 40, 1), (24, 24), (12, 12), "table", torch.float32),  # Swin V2 at 384: 576 tokens
    ((1, 24, 24, 1), (24, 24), (0, 0), "dense", torch.bfloat16),
], ids=lambda v: str(v).replace(" ", ""))
def test_windows_of_several_blocks(device, backend, shape, window, shift, bias_kind, dtype):
    """Windows over one tile: the online softmax over key blocks, the dq kernel's two passes
    (delta, then dq), the bias-gradient partials of a run, the last block partial, padding
    and shifts. A backend that cannot run the window names its limit instead."""
    check_case_or_named_limit(device, backend, shape, window, shift, bias_kind, dtype)


def check_case_or_named_limit(device, backend, shape, window, shift, bias_kind, dtype):
    """check_case with head_dim 16 (shape: the grid, then heads); a backend that cannot run
    the window must raise with the reason fused_shape_reason gives."""
    *grid, heads = shape
    reason = fused_shape_reason(backend, window, 16, torch.device(device))
    if reason is not None:
        with pytest.raises(uk.BackendUnavailableError, match=re.escape(reason)):
            check_case(device, backend, tuple(grid), heads, 16, window, shift, bias_kind, dtype)
        return
    check_case(device, backend, tuple(grid), heads, 16, window, shift, bias_kind, dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape,window,shift,bias_kind,dtype", [
    ((1, 5, 9, 11, 2), (3, 4, 4), (1, 2, 2), "table", torch.float32),  # padded and shifted on every axis
    ((2, 4, 8, 8, 1), (2, 4, 4), (0, 2, 2), "dense", torch.bfloat16),  # no shift in time
    ((1, 6, 9, 8, 1), (4, 7, 7), (2, 3, 3), "table", torch.float32),   # Video Swin's shrunk (4, 7, 7): 4 blocks
    ((1, 3, 5, 6, 2), (3, 5, 6), (0, 0, 0), None, torch.float16),      # one window, no bias
], ids=lambda v: str(v).replace(" ", ""))
def test_3d_windows(device, backend, shape, window, shift, bias_kind, dtype):
    """(B, T, H, W, heads, D) with (wt, wh, ww) windows: frames, rows and columns in the
    index math, the 27-region shift mask, torchvision's 3D table."""
    check_case_or_named_limit(device, backend, shape, window, shift, bias_kind, dtype)


@pytest.mark.parametrize("device,backend", CASES)
def test_whole_image_window(device, backend):
    """Global attention as one window over the whole grid, with a relative position table:
    SAM's 64 x 64 (4096 tokens, the fused kernels' limit; CUDA streams its tiles) on a GPU; a
    padded 30 x 20 grid in a 32 x 20 window (640 tokens: 10 Triton blocks, 20 CUDA tiles) on
    the CPU, where 4096 tokens take three minutes in the interpreter."""
    grid, window = ((64, 64), (64, 64)) if device == "cuda" else ((30, 20), (32, 20))
    check_case(device, backend, (1, *grid), 1, 16, window, (0, 0), "table", torch.float32)


@pytest.mark.parametrize("device,backend", backend_cases(include_reference=False, devices=("cuda",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_runs_of_windows_per_program(device, backend, dtype):
    """Enough windows (1100 x 2 heads) that the GPU launches give each program or block a run
    of several windows, the last run shorter: the bias staged once per run, the loop's
    barriers and the run ends all matter here."""
    check_case(device, backend, (11, 70, 70), 2, 32, (7, 7), (3, 3), "table", dtype)


@pytest.mark.parametrize("device,backend", [c for c in FUSED_CASES if c.values[1] == "triton"])
# Each block size once, each dtype once (CI time: 45 s a case in the interpreter).
@pytest.mark.parametrize("block,dtype", [(16, torch.bfloat16), (32, torch.float32)], ids=["16-bf16", "32-fp32"])
def test_triton_smaller_block_fallback(device, backend, block, dtype, monkeypatch):
    """The configurations the launcher falls back to where the preferred one does not fit
    the device's shared memory (fp32 at head_dim 128 on 99 KB GPUs: a 32-token block): a
    7x7 window then spans several query/key blocks, the last one partial. The interpreter
    runs the first candidate, so the fallback is made the only one here."""
    from ultron_kernels.triton import window_attention as attn

    monkeypatch.setattr(attn, "launch_candidates",
                        lambda head_dim, tokens, backward: [dict(BLOCK=block, num_warps=4, num_stages=1)])
    check_case(device, backend, (2, 9, 11), 2, 32, (7, 7), (3, 3), "table", dtype)


@pytest.mark.parametrize("device,backend", CASES)
@given(b=st.integers(1, 2), h=st.integers(1, 15), w=st.integers(1, 15), heads=st.integers(1, 2),
       wh=st.integers(2, 8), ww=st.integers(2, 8), bias_kind=st.sampled_from([None, "table", "dense"]),
       data=st.data())
def test_random_shapes(device, backend, b, h, w, heads, wh, ww, bias_kind, data):
    shift = (data.draw(st.integers(0, wh - 1)), data.draw(st.integers(0, ww - 1)))
    check_case(device, backend, (b, h, w), heads, 16, (wh, ww), shift, bias_kind, torch.float32)


def test_gradcheck_reference_float64():
    q, k, v, bias = make_inputs((1, 5, 6), 2, 4, (3, 4), "table", torch.float64, "cpu", False)
    bias = bias.double()
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: uk.window_attention(q, k, v, (3, 4), (1, 2), b, backend="reference"), inputs)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_bias_gradient_is_bitwise_deterministic(device, backend):
    q, k, v, bias = make_inputs((2, 14, 14), 2, 16, (7, 7), "table", torch.float32, device)
    bias.requires_grad_()
    out = uk.window_attention(q, k, v, 7, 3, bias, backend=backend)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, bias, g, retain_graph=True)[0]
    second = torch.autograd.grad(out, bias, g)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", FUSED_CASES)
def test_opcheck(device, backend):
    for bias_kind, kind in (("table", 1), ("dense", 2), (None, 0)):
        q, k, v, bias = make_inputs((1, 9, 8), 2, 16, (4, 4), bias_kind, torch.float32, device, False)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        bias = bias.requires_grad_() if bias is not None else None
        torch.library.opcheck(_fused_forward, (*leaves, bias, kind, [4, 4], [2, 1], None, 0.25, False,
                                               None, None, False, backend))


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    module = WindowAttention(32, 2, window_size=4, shift_size=2, backend=backend).to(device)
    compiled = torch.compile(module, fullgraph=True,
                             backend="inductor" if device == "cuda" else "aot_eager")
    x = torch.randn(1, 8, 9, 32, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
        out.sum().backward()
    dynamo = [str(w.message) for w in caught if "ynamo" in str(w.message)]
    assert not dynamo, dynamo  # e.g. a functools.lru_cache on the traced path
    module.backend = "reference"
    assert_parity("compiled module", out, module.double()(x.double()), torch.float32)
    assert module.relative_position_bias_table.grad is not None


@pytest.mark.parametrize("device,backend", CASES)
def test_autocast(device, backend):
    module = WindowAttention(32, 2, window_size=7, shift_size=3, backend=backend).to(device)
    x = torch.randn(1, 9, 10, 32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    module.backend = "reference"
    assert_parity("autocast module", out, module.double()(x.double()), torch.bfloat16)


def test_inputs_are_not_modified():
    q, k, v, bias = make_inputs((1, 8, 8), 1, 16, (4, 4), "table", torch.float32, "cpu")
    copies = [t.clone() for t in (q, k, v, bias)]
    uk.window_attention(q, k, v, 4, 2, bias, backend="triton")
    assert all(torch.equal(a, c) for a, c in zip((q, k, v, bias), copies))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fully_masked_query_row(device, backend, dtype):
    """A query whose every key is masked by a -inf dense bias: one defined behaviour on every
    backend (before, CUDA gave NaN, Triton 0, the reference NaN). Its output row is 0, every
    output and gradient is finite, the row's dq and bias gradient are 0, and the other rows
    match the reference's."""
    q, k, v, bias = make_inputs((1, 4, 8), 2, 16, (4, 4), "dense", dtype, device, packed=False)
    bias[1, 5, :] = float("-inf")   # head 1, query 5 of every window: no key left
    bias[0, 2, 3] = float("-inf")   # one masked pair in an otherwise live row
    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    with poisoned_outputs():
        out = uk.window_attention(*leaves[:3], 4, 0, leaves[3], backend=backend)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert out[:, 1::4, 1::4, 1].abs().max() == 0 and grads[0][:, 1::4, 1::4, 1].abs().max() == 0
    assert grads[3][1, 5].abs().max() == 0 and grads[3][0, 2, 3] == 0
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    expected = window_attention_reference(*ref_leaves[:3], (4, 4), (0, 0), ref_leaves[3], 16 ** -0.5)
    ref_grads = torch.autograd.grad(expected, ref_leaves, torch.ones_like(expected))
    assert_parity("out", out, expected, dtype)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_parity(name, got, want, dtype)


def _qkv(shape=(1, 8, 8, 2, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(q=torch.randn(1, 8, 8, 32)), ValueError, "q: expected a 5-D"),
    (lambda a: a.update(k=torch.randn(1, 8, 8, 2, 8)), ValueError, "k has shape"),
    (lambda a: a.update(v=a["v"].half()), TypeError, "v has dtype"),
    (lambda a: a.update(window_size=65, rel_pos_bias=None, backend="triton"), uk.BackendUnavailableError,
     r"window \(65, 65\) has 4225 tokens; the triton kernels run windows of at most 4096"),
    (lambda a: a.update(window_size=0), ValueError, "window_size must be >= 1"),
    (lambda a: a.update(window_size=(4, 4, 4)), TypeError,
     r"window_size must be an int or a pair of ints \(wh, ww\) for \(B, H, W, heads, D\) tensors, got \(4, 4, 4\)"),
    (lambda a: a.update(q=a["q"][:, None], k=a["k"][:, None], v=a["v"][:, None], window_size=(4, 4)), TypeError,
     r"window_size must be an int or 3 ints \(wt, wh, ww\) for \(B, T, H, W, heads, D\) tensors"),
    (lambda a: a.update(q=a["q"][:, None], k=a["k"][:, None], v=a["v"][:, None], window_size=(1, 4, 4),
                        shift_size=(0, 2)), TypeError, "shift_size must be an int or 3 ints"),
    (lambda a: a.update(q=a["q"][:, None], k=torch.randn(1, 2, 8, 8, 2, 16), v=a["v"][:, None],
                        window_size=(1, 4, 4)), ValueError, r"k has shape \(1, 2, 8, 8, 2, 16\)"),
    (lambda a: a.update(q=a["q"][:, None], k=a["k"][:, None], v=a["v"][:, None], window_size=(2, 4, 4),
                        shift_size=(2, 0, 0)), ValueError, r"shift_size must satisfy 0 <= shift < window"),
    (lambda a: a.update(q=a["q"][:, None], k=a["k"][:, None], v=a["v"][:, None], window_size=(2, 4, 4)),
     ValueError, r"rel_pos_bias: expected a table of shape \(147, 2\)"),
    (lambda a: a.update(q=torch.randn(1, 1, 1, 8, 8, 2, 16)), ValueError, "q: expected a 5-D"),
    (lambda a: a.update(shift_size=4), ValueError, "shift_size must satisfy"),
    (lambda a: a.update(shift_size=-1), ValueError, "shift_size must satisfy"),
    (lambda a: a.update(rel_pos_bias=torch.randn(48, 2)), ValueError, "rel_pos_bias: expected a table"),
    (lambda a: a.update(q=torch.randn(1, 8, 8, 16, 2).transpose(-1, -2)), ValueError, "must be contiguous"),
    (lambda a: a.update(q=torch.randn(1, 8, 8, 2, 160), k=torch.randn(1, 8, 8, 2, 160),
                        v=torch.randn(1, 8, 8, 2, 160), backend="triton"),
     uk.BackendUnavailableError, "head_dim 160 is over the fused kernels' 128"),
    (lambda a: a.update(backend="flash"), ValueError, "backend must be one of"),
])
def test_bad_input(change, error, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, window_size=4, shift_size=0,
                rel_pos_bias=torch.randn(49, 2), backend="auto")
    change(args)
    with pytest.raises(error, match=match):
        uk.window_attention(**args)


def test_auto_uses_reference_for_unsupported_head_dim():
    q, k, v = (torch.randn(1, 8, 8, 2, 160) for _ in range(3))
    out = uk.window_attention(q, k, v, 4)
    assert out.shape == q.shape


def test_reference_matches_timm_swin_block():
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    for shift in (0, 3):
        block = timm_swin.SwinTransformerBlock(dim=32, input_resolution=(14, 21), num_heads=2,
                                               window_size=7, shift_size=shift).eval()
        ours = WindowAttention(32, 2, window_size=7, shift_size=shift, backend="reference")
        ours.load_state_dict(block.attn.state_dict())
        x = torch.randn(2, 14, 21, 32)
        with torch.no_grad():
            expected = block._attn(x)
            got = ours(x)
        # timm masks with -100 instead of -inf: agreement to float32 rounding.
        assert_parity(f"timm shift={shift}", got, expected.double(), torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
def test_module_loads_timm_state_dict(device, backend):
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    theirs = timm_swin.WindowAttention(32, num_heads=2, window_size=7).to(device)
    ours = WindowAttention(32, 2, window_size=7, backend=backend).to(device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, 7, 32, device=device)
    with torch.no_grad():
        expected = theirs(x.reshape(3, 49, 32)).reshape(3, 7, 7, 32)
        assert_parity("timm module", ours(x), expected.double(), torch.float32)


@pytest.mark.gpu
def test_cuda_streams_windows_over_its_shared_memory():
    """16 x 16 windows at head_dim 128 in bf16: 1.3 MB of shared memory per block as one tile
    in the backward; the CUDA kernels stream their tiles instead (and auto takes a backend)."""
    if uk.available_backends("cuda")["cuda"] != "available":
        pytest.skip(uk.available_backends("cuda")["cuda"])
    check_case("cuda", "cuda", (1, 16, 16), 1, 128, (16, 16), (0, 0), "table", torch.bfloat16, packed=False)
    q, k, v, bias = make_inputs((1, 16, 16), 1, 128, (16, 16), "table", torch.bfloat16, "cuda", packed=False)
    assert uk.window_attention(q, k, v, 16, 0, bias).shape == q.shape
