"""The CUDA backend's kernels on the CPU, through the host simulation (ultron_kernels._C_sim):
every path the host code can choose is taken on purpose and checked against the float64
oracle, the simulation's launch log showing which kernel ran. Also the raw C++ ops' own
validation, which C++ callers rely on (the Python layer checks first, so only direct calls
reach it). The parity suites of test_dilated_conv.py and test_window_attention.py run the
same backend over their shapes; this file makes sure no branch is left out."""

from __future__ import annotations

import re
import threading

import pytest
import torch

import ultron_kernels as uk
from ultron_kernels.ops.grouped_depthwise_conv import pack_weights
from ultron_kernels.reference.window_attention import window_attention_reference
from helpers import assert_parity, poisoned_outputs

pytestmark = pytest.mark.skipif(uk.available_backends("cpu")["cuda"] != "available",
                                reason=uk.available_backends("cpu")["cuda"])

TYPE_NAMES = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sim_ops():
    return torch.ops.ultron_kernels_cuda_sim


def launches(fn):
    """Runs fn() and returns (its result, the simulation's launch-log lines)."""
    sim_ops().take_launch_log()
    result = fn()
    return result, list(sim_ops().take_launch_log())


def grid_x(line: str) -> int:
    return int(re.search(r"grid=\((\d+),", line).group(1))


# ---------------------------------------------------------------- convolution paths

# id, x shape, K, dilation, layout, stride, kernels that must run ({T}: the element type,
# {V}: the 16-byte vector width in elements).
CONV_PATHS = [
    ("nchw-tile", (2, 6, 37, 35), 3, (1, 2, 3), torch.contiguous_format, 1,
     ["gather_nchw_tile_kernel<{T}, 3, false>", "gather_nchw_tile_kernel<{T}, 3, true>",
      "grad_weight_partial_kernel<{T}, 3, false>"]),
    ("nchw-tile-stride2", (1, 4, 33, 34), 5, (1, 2), torch.contiguous_format, 2,
     ["gather_nchw_tile_kernel<{T}, 5, false>", "gather_nchw_tile_kernel<{T}, 5, true>"]),
    ("nchw-direct", (1, 2, 40, 21), 7, (10, 12), torch.contiguous_format, 1,  # halo over 32 KB
     ["gather_nchw_kernel<{T}, 7, false>", "gather_nchw_kernel<{T}, 7, true>"]),
    ("nhwc-vector", (2, 16, 9, 11), 3, (1, 2), torch.channels_last, 1,
     ["gather_nhwc_kernel<{T}, 3, {V}, false>", "gather_nhwc_kernel<{T}, 3, {V}, true>",
      "grad_weight_partial_kernel<{T}, 3, true>"]),
    ("nhwc-scalar", (1, 6, 9, 7), 3, (1, 2, 3, 1, 2, 3), torch.channels_last, 2,
     ["gather_nhwc_kernel<{T}, 3, 1, false>", "gather_nhwc_kernel<{T}, 3, 1, true>"]),
    ("runtime-k", (1, 3, 12, 10), 9, 2, torch.contiguous_format, 1,
     ["gather_nchw_tile_kernel<{T}, 0, false>", "grad_weight_partial_kernel<{T}, 0, false>"]),
    # RepLKNet's 31x31: rows slide through registers in both gathers; grad weight stages tiles
    # of 8 rows (two images, a partial last tile and column tile) and sums 4 taps per thread.
    ("large-kernel", (2, 3, 37, 35), 31, 1, torch.contiguous_format, 1,
     ["gather_nchw_tile_kernel<{T}, 0, false>", "gather_nchw_tile_kernel<{T}, 0, true>",
      "grad_weight_large_kernel<{T}>"]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CONV_PATHS, ids=[c[0] for c in CONV_PATHS])
def test_conv_path(case, dtype):
    _, shape, k, dilation, layout, stride, expected = case
    x = torch.randn(shape, dtype=dtype).to(memory_format=layout).requires_grad_()
    w = torch.randn(shape[1], k, k, dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], dtype=dtype, requires_grad=True)

    def run():
        with poisoned_outputs():
            y = uk.channelwise_dilated_conv2d(x, w, b, dilation, stride, backend="cuda")
            g = torch.randn_like(y)
            return y, g, torch.autograd.grad(y, (x, w, b), g)

    (y, g, grads), log = launches(run)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = uk.channelwise_dilated_conv2d(*leaves, dilation, stride, backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    for name, got, want in zip(("y", "dx", "dw", "db"), (y,) + grads, (ref,) + ref_grads):
        assert_parity(name, got, want, dtype)
    names = [line.split(" grid=")[0] for line in log]
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    for kernel in expected:
        assert kernel.format(T=TYPE_NAMES[dtype], V=vec) in names, names


# ---------------------------------------------------------------- attention paths

def attention_case(shape, heads, head_dim, window, shift, dtype, bias_kind="table", row_pad=0,
                   raw=False):
    """Runs the CUDA backend forward and backward, checks parity, returns the launch log.
    row_pad > 0: q, k, v are views with row_pad unused elements after each head's row, so
    their rows are not 16-byte aligned. raw: call the C++ ops directly (no Python checks)."""
    b, h, w = shape
    base = [torch.randn(b, h, w, heads, head_dim + row_pad, dtype=dtype) for _ in range(3)]
    q, k, v = (t[..., :head_dim].requires_grad_(False) for t in base)
    wh, ww = window
    bias = None
    if bias_kind == "table":
        bias = torch.randn((2 * wh - 1) * (2 * ww - 1), heads)
    elif bias_kind == "dense":
        bias = torch.randn(heads, wh * ww, wh * ww)
    scale = head_dim ** -0.5
    grad_out = torch.randn(b, h, w, heads, head_dim, dtype=dtype)

    def run():
        with poisoned_outputs():
            if raw:
                kind = {"table": 1, "dense": 2, None: 0}[bias_kind]
                out, lse = sim_ops().window_attention_fwd(q, k, v, bias, kind, list(window), list(shift), None,
                                                          scale, False, None, None, False)
                dq, dk, dv, *_ = sim_ops().window_attention_bwd(grad_out, q, k, v, lse, bias, kind,
                                                               list(window), list(shift), None, scale, False,
                                                               None, None, False, False, False, False)
                return out, (dq, dk, dv)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = uk.window_attention(*leaves, window, shift, bias, backend="cuda")
            return out, torch.autograd.grad(out, leaves, grad_out)

    (out, grads), log = launches(run)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = window_attention_reference(*ref_leaves, window, shift, None if bias is None else bias.double(), scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads), (ref,) + ref_grads):
        assert_parity(name, got, want, dtype)
    return log


def kernel_lines(log, kernel):
    return [line for line in log if line.startswith(kernel + " ")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("row_pad", [0, 4], ids=["16-byte-rows", "unaligned-rows"])
def test_attention_tensor_core_path(dtype, row_pad):
    log = attention_case((2, 9, 11), 2, 16, (7, 7), (3, 2), dtype, "dense", row_pad=row_pad)
    t = TYPE_NAMES[dtype]
    assert kernel_lines(log, f"window_attn_fwd_tc_kernel<{t}, false>") and kernel_lines(log, f"window_attn_bwd_tc_kernel<{t}, false>"), log


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_attention_simt_path(dtype):
    # fp32 always takes the SIMT kernels; 16-bit ones do above 128 tokens (12 x 12 = 144).
    window = (3, 5) if dtype == torch.float32 else (12, 12)
    log = attention_case((1, 13, 12), 2, 16, window, (1, 2), dtype)
    t = TYPE_NAMES[dtype]
    assert kernel_lines(log, f"window_attn_fwd_kernel<{t}, false>") and kernel_lines(log, f"window_attn_bwd_kernel<{t}, false>"), log


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_attention_runs_of_windows_per_block(dtype, monkeypatch):
    """One simulated SM: 18 windows x 2 heads make runs of 5 windows per block, the last run
    shorter (3): the bias staged once per run and the run ends matter."""
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM_SMS", "1")
    log = attention_case((3, 14, 21), 2, 16, (7, 7), (3, 3), dtype)
    bwd = [line for line in log if line.startswith("window_attn_bwd")]
    assert bwd and all(grid_x(line) == 4 for line in bwd), log
    if dtype != torch.float32:
        fwd = kernel_lines(log, f"window_attn_fwd_tc_kernel<{TYPE_NAMES[dtype]}, false>")
        assert fwd and grid_x(fwd[0]) == 4, log


@pytest.mark.parametrize("head_dim", [48, 80, 96, 112])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_raw_op_tensor_cores_any_multiple_of_16(head_dim, dtype):
    """Defect: the tensor-core tile copies split indices with shifts and masks that hold for
    powers of two only; head_dim 48/80/96/112 reached them through a direct C++ call and
    corrupted memory. Any multiple of 16 is now exact, on the tensor-core path."""
    log = attention_case((1, 8, 9), 1, head_dim, (4, 4), (2, 2), dtype, raw=True)
    assert kernel_lines(log, f"window_attn_fwd_tc_kernel<{TYPE_NAMES[dtype]}, false>"), log


def test_no_tensor_cores_before_sm80(monkeypatch):
    """Defect: the tensor-core kernels' bodies exist only for sm_80+, while the host chose the
    path from the device alone. The host now asks which architecture the kernel was compiled
    for: on a (simulated) sm_75, bf16 attention takes the SIMT kernels, and is exact."""
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM_ARCH", "75")
    log = attention_case((1, 9, 9), 2, 16, (7, 7), (3, 3), torch.bfloat16)
    assert kernel_lines(log, "window_attn_fwd_kernel<c10::BFloat16, false>"), log
    assert not [line for line in log if "_tc_kernel" in line], log


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bias_kind", ["table", "dense"])
def test_attention_streamed_path(dtype, bias_kind, monkeypatch):
    """Windows whose one-block tiles do not fit the device stream 32-token tiles: 17 x 17 = 289
    tokens at head_dim 64 need 156 KB (forward) and 1.3 MB (backward) as one tile, over a
    simulated sm_86's 99 KB. Ten tiles per window, the last one partial; both axes shifted and
    padded; two heads. The forward, the dq kernel, then the dk/dv kernel."""
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM_ARCH", "86")
    log = attention_case((1, 20, 19), 2, 64, (17, 17), (5, 8), dtype, bias_kind)
    t = TYPE_NAMES[dtype]
    kernels = ("window_attn_fwd_streamed_kernel", "window_attn_bwd_dq_streamed_kernel",
               "window_attn_bwd_dkdv_streamed_kernel")
    assert [line.split(" grid=")[0] for line in log] == [f"{kernel}<{t}, false>" for kernel in kernels], log


@pytest.mark.parametrize("arch,path", [("90", "one tile"), ("86", "streamed"), ("75", None)])
def test_shared_memory_limit_follows_the_architecture(arch, path, monkeypatch):
    """8 x 8 windows, head_dim 128, fp32 (SIMT): the backward needs 160 KB per block as one
    tile, within sm_90's 227 KB; over sm_86's 99 KB it streams its tiles (82 KB). On sm_75's
    64 KB even the streamed forward (67712 bytes) does not fit: the backend says so before
    launching."""
    monkeypatch.setenv("ULTRON_KERNELS_CUDA_SIM_ARCH", arch)
    if path is None:
        q, k, v = (torch.randn(1, 8, 8, 1, 128, requires_grad=True) for _ in range(3))
        with pytest.raises(uk.BackendUnavailableError, match="67712 bytes of shared memory per block in the CUDA "
                                                             "kernels' streamed tiles"):
            uk.window_attention(q, k, v, 8, 0, None, backend="cuda")
        return
    log = attention_case((1, 8, 8), 1, 128, (8, 8), (0, 0), torch.float32, None)
    streamed = [line for line in log if "_streamed_kernel" in line]
    assert len(streamed) == (2 if path == "streamed" else 0), log  # the backward's two kernels


# Mixed kernel shapes run the same kernels with the shape read at run time (K = 0): an identity
# group, a square and two bands in groups of 8 channels (16-byte vectors for 16-bit types).
GROUPED_PATHS = [
    ("nhwc-mixed", torch.channels_last, ["gather_nhwc_kernel<{T}, 0, {V}, false>",
                                         "gather_nhwc_kernel<{T}, 0, {V}, true>",
                                         "grad_weight_partial_kernel<{T}, 0, true>"]),
    ("nchw-mixed", torch.contiguous_format, ["gather_nchw_tile_kernel<{T}, 0, false>",
                                             "gather_nchw_tile_kernel<{T}, 0, true>",
                                             "grad_weight_partial_kernel<{T}, 0, false>"]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GROUPED_PATHS, ids=[c[0] for c in GROUPED_PATHS])
def test_grouped_conv_path(case, dtype):
    _, layout, expected = case
    groups = [uk.DepthwiseGroup.identity(8), uk.DepthwiseGroup(8, 3), uk.DepthwiseGroup(8, (1, 11)),
              uk.DepthwiseGroup(8, (11, 1))]
    x = torch.randn(1, 32, 13, 9, dtype=dtype).to(memory_format=layout).requires_grad_()
    weights = [None] + [torch.randn(8, 1, *s, dtype=dtype, requires_grad=True) for s in ((3, 3), (1, 11), (11, 1))]

    def run():
        with poisoned_outputs():
            y = uk.grouped_depthwise_conv2d(x, weights, groups, backend="cuda")
            g = torch.randn_like(y)
            return y, g, torch.autograd.grad(y, [x] + weights[1:], g)

    (y, g, grads), log = launches(run)
    leaves = [t.detach().double().requires_grad_() for t in [x] + weights[1:]]
    ref = uk.grouped_depthwise_conv2d(leaves[0], [None] + leaves[1:], groups, backend="reference")
    for name, got, want in zip(("y", "dx", "dw1", "dw2", "dw3"), (y,) + grads,
                               (ref,) + torch.autograd.grad(ref, leaves, g.double())):
        assert_parity(name, got, want, dtype)
    names = [line.split(" grid=")[0] for line in log]
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    for kernel in expected:
        assert kernel.format(T=TYPE_NAMES[dtype], V=vec) in names, names


# ---------------------------------------------------------------- raw C++ op validation

def _qkv(shape=(1, 8, 8, 2, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def _attn_fwd(**change):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, bias=torch.randn(49, 2), bias_kind=1, window=[4, 4], shift=[0, 0],
                scale=torch.full((2,), 0.25), k_pad=None, v_pad=None, rel_rows=None)
    args.update(change)
    return sim_ops().window_attention_fwd(args["q"], args["k"], args["v"], args["bias"], args["bias_kind"],
                                          args["window"], args["shift"], args["scale"], 0.0, False, args["k_pad"],
                                          args["v_pad"], False, args["rel_rows"])


SPEC = [4, 3, 3, 1, 1, 1, 1, 1, 1]  # one group: 4 channels, 3x3, dilation 1, padding 1


def _conv_fwd(groups=SPEC, **change):
    args = dict(x=torch.randn(1, 4, 6, 6), weight=torch.randn(36), bias=None, stride=1)
    args.update(change)
    return sim_ops().grouped_dwconv2d_fwd(args["x"], args["weight"], args["bias"], list(groups), args["stride"])


RAW_BAD = [
    ("window 0", lambda: _attn_fwd(window=[0, 4]), ValueError, "window must be in"),
    ("shift = window", lambda: _attn_fwd(shift=[4, 0]), ValueError, r"shift must be in \[0, window\)"),
    ("negative shift", lambda: _attn_fwd(shift=[0, -1]), ValueError, r"shift must be in \[0, window\)"),
    ("table of the wrong size", lambda: _attn_fwd(bias=torch.randn(48, 2)), ValueError, "must have sizes"),
    ("dense bias as a table", lambda: _attn_fwd(bias=torch.randn(2, 16, 16)), ValueError, "must have sizes"),
    ("dense of the wrong size", lambda: _attn_fwd(bias=torch.randn(2, 16, 15), bias_kind=2), ValueError,
     "must have sizes"),
    ("kind without a bias", lambda: _attn_fwd(bias=None), ValueError, "needs a bias tensor"),
    ("unknown kind", lambda: _attn_fwd(bias_kind=3), ValueError, "bias_kind must be"),
    ("integer bias", lambda: _attn_fwd(bias=torch.ones(49, 2, dtype=torch.int64)), TypeError, "floating point"),
    ("scale of the wrong shape", lambda: _attn_fwd(scale=torch.ones(3)), ValueError,
     r"scale must have shape \(heads,\) = \(2\)"),
    ("integer scale", lambda: _attn_fwd(scale=torch.ones(2, dtype=torch.int32)), TypeError,
     "scale must be floating point"),
    ("k_pad without v_pad", lambda: _attn_fwd(k_pad=torch.zeros(2, 16)), ValueError, "given together"),
    ("pad of the wrong shape", lambda: _attn_fwd(k_pad=torch.zeros(2, 8), v_pad=torch.zeros(2, 8)), ValueError,
     r"k_pad must have shape \(heads, head_dim\) = \(2, 16\)"),
    ("pad dtype", lambda: _attn_fwd(k_pad=torch.zeros(2, 16, dtype=torch.float64),
                                    v_pad=torch.zeros(2, 16, dtype=torch.float64)), TypeError, "must have q's dtype"),
    # SAM's decomposed relative position: (1, 8, 8, 2) like q, (2*4 - 1) + (2*4 - 1) = 14 columns.
    ("rel_rows columns", lambda: _attn_fwd(rel_rows=torch.randn(1, 8, 8, 2, 13)), ValueError,
     r"rel_rows \(rel_pos's per-query rows\) must have sizes \[1, 8, 8, 2, 14\]"),
    ("rel_rows of another batch", lambda: _attn_fwd(rel_rows=torch.randn(2, 8, 8, 2, 14)), ValueError,
     "rel_rows .* must have sizes"),
    ("rel_rows dtype", lambda: _attn_fwd(rel_rows=torch.randn(1, 8, 8, 2, 14, dtype=torch.float64)), TypeError,
     "rel_rows must have q's dtype Float, got Double"),
    ("rel_rows with a 3D window", lambda: _attn_fwd(q=torch.randn(1, 2, 8, 8, 2, 16), k=torch.randn(1, 2, 8, 8, 2, 16),
                                                     v=torch.randn(1, 2, 8, 8, 2, 16), window=[2, 4, 4],
                                                     shift=[0, 0, 0], bias=None, bias_kind=0,
                                                     rel_rows=torch.randn(1, 2, 8, 8, 2, 14)),
     ValueError, "rel_rows .* is defined for 2D windows; q is 6-D"),
    ("H past int32", lambda: _attn_fwd(q=torch.empty(0, 2**31, 1, 2, 16), k=torch.empty(0, 2**31, 1, 2, 16),
                                       v=torch.empty(0, 2**31, 1, 2, 16), bias=None, bias_kind=0),
     ValueError, "H = 2147483648 does not fit"),
    ("groups not 9 ints each", lambda: _conv_fwd(groups=SPEC[:8]), ValueError, "9 ints per group"),
    ("channels do not sum to C", lambda: _conv_fwd(groups=[3] + SPEC[1:]), ValueError, "sum to 3, x has C = 4"),
    ("kernel 32", lambda: _conv_fwd(groups=[4, 32, 1] + SPEC[3:]), ValueError, r"kernel must be in \[1, 31\]"),
    ("dilation 0", lambda: _conv_fwd(groups=[4, 3, 3, 0] + SPEC[4:]), ValueError, "dilation must be in"),
    ("negative padding", lambda: _conv_fwd(groups=SPEC[:5] + [-1, 1, 1, 1]), ValueError, "padding must be in"),
    ("identity at stride 2", lambda: _conv_fwd(groups=[4, 0, 0, 1, 1, 0, 0, 0, 0], weight=torch.randn(0), stride=2),
     ValueError, "identity group needs stride 1"),
    ("output sizes differ", lambda: _conv_fwd(groups=[2, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 3, 1, 1, 0, 0, 0, 0],
                                              weight=torch.randn(36)), ValueError, "groups\\[0\\]"),
    ("kernel beyond the image", lambda: _conv_fwd(groups=[4, 9, 9, 1, 1, 0, 0, 0, 0], weight=torch.randn(324)),
     ValueError, "smaller than its dilated kernel"),
    ("stride 3", lambda: _conv_fwd(stride=3), ValueError, "stride must be 1 or 2"),
    ("packed weight size", lambda: _conv_fwd(weight=torch.randn(35)), ValueError, "a contiguous 1-D tensor of 36"),
    ("weight dtype", lambda: _conv_fwd(weight=torch.randn(36, dtype=torch.float16)), TypeError,
     "differs from x dtype"),
    ("bias length", lambda: _conv_fwd(bias=torch.randn(3)), ValueError, "bias must hold C = 4"),
    ("grad_out shape", lambda: sim_ops().grouped_dwconv2d_bwd(torch.randn(1, 4, 5, 6), torch.randn(1, 4, 6, 6),
                                                              torch.randn(36), SPEC, 1),
     ValueError, "grad_out must have the forward output's sizes"),
    ("grad_out shape, stride 2", lambda: sim_ops().grouped_dwconv2d_bwd(torch.randn(1, 4, 6, 6),
                                                                        torch.randn(1, 4, 6, 6), torch.randn(36),
                                                                        SPEC, 2),
     ValueError, "grad_out must have the forward output's sizes"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in RAW_BAD], ids=[c[0] for c in RAW_BAD])
def test_raw_ops_validate_their_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_raw_conv_derives_the_channel_runs_itself():
    """The raw op derives the channels_last vector width from the groups itself (a caller's
    wrong one would read past a group). Groups of 4 channels must come out exact with vectors
    of 4 floats, not 8."""
    x = torch.randn(1, 16, 7, 9).to(memory_format=torch.channels_last)
    w = torch.randn(16, 3, 3)
    rates = [1, 1, 1, 1, 2, 2, 2, 2] * 2
    groups = [v for d in (1, 2, 1, 2) for v in (4, 3, 3, d, d, d, d, d, d)]
    out, log = launches(lambda: sim_ops().grouped_dwconv2d_fwd(x, pack_weights(w.split(4), x), None, groups, 1))
    ref = uk.channelwise_dilated_conv2d(x.double(), w.double(), None, tuple(rates), backend="reference")
    assert_parity("out", out, ref, torch.float32)
    assert any(line.startswith("gather_nhwc_kernel<float, 3, 4, false>") for line in log), log


def test_concurrent_calls_with_different_shared_memory():
    """Two host threads launching kernels with different dynamic shared memory sizes (the
    attribute above 48 KB is set once per kernel to the device's maximum, not per call)."""
    errors = []

    def worker(window):
        try:
            for _ in range(2):
                attention_case((1, window, window), 1, 64, (window, window), (0, 0), torch.float32, None)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in (8, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
