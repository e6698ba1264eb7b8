"""window_attention's decomposed relative position (SAM / ViTDet, issue #23): the reference
backend against timm's own attention (global and windowed blocks, padded grids), the q
gradient that only the bias carries, bad input, and the fused backends naming that they do
not run it."""

from __future__ import annotations

import pytest
import torch

import ultron_kernels as uk
from helpers import assert_parity, backend_cases

sam = pytest.importorskip("timm.models.vision_transformer_sam")
pytestmark = pytest.mark.usefixtures("seeded_per_test")


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """timm zero-initialises the rel-pos tables, which would hide a wrong bias."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module.double()


def ours(attn, x, window, pad_kv=False):
    """timm's Attention computed as one op call on the (B, H, W, C) grid x."""
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).view(b, h, w, 3, attn.num_heads, -1)
    q, k, v = qkv.unbind(3)
    pads = None
    if pad_kv:  # zero-padded tokens through the projection: its k and v biases
        pads = tuple(part.view(attn.num_heads, -1) for part in attn.qkv.bias.chunk(3)[1:])
    out = uk.window_attention(q, k, v, window, 0, None, attn.scale, pad_kv=pads,
                              rel_pos=(attn.rel_pos_h, attn.rel_pos_w), backend="reference")
    return attn.proj(out.reshape(b, h, w, -1))


def assert_same_gradients(loss_ours, loss_theirs, named_parameters, x):
    named = list(named_parameters)
    params = [x, *(p for _, p in named)]
    names = ["x", *(n for n, _ in named)]
    for name, got, want in zip(names, torch.autograd.grad(loss_ours, params, retain_graph=True),
                               torch.autograd.grad(loss_theirs, params)):
        assert_parity(f"d{name}", got, want, torch.float64)


def test_global_block_matches_timm():
    """A global block: the whole (7, 9) grid is one window, tables (13, D) and (17, D)."""
    attn = randomised(sam.Attention(32, num_heads=2, use_rel_pos=True, input_size=(7, 9)))
    x = torch.randn(2, 7, 9, 32, dtype=torch.float64, requires_grad=True)
    got, want = ours(attn, x, (7, 9)), attn(x)
    assert_parity("out", got, want, torch.float64)
    g = torch.randn_like(want)
    assert_same_gradients((got * g).sum(), (want * g).sum(), attn.named_parameters(), x)


def test_windowed_block_on_a_padded_grid_matches_timm():
    """A windowed block (window 4) on a 9 x 10 grid: timm pads the normalised grid with zeros
    and partitions it; the op takes the grid and pad_kv (the projection's k and v biases)."""
    block = randomised(sam.Block(32, num_heads=2, use_rel_pos=True, window_size=4))
    x = torch.randn(2, 9, 10, 32, dtype=torch.float64, requires_grad=True)
    normed = block.norm1(x)
    windows, padded = sam.window_partition(normed, 4)
    want = sam.window_unpartition(block.attn(windows), 4, (9, 10), padded)
    got = ours(block.attn, normed, (4, 4), pad_kv=True)
    assert_parity("out", got, want, torch.float64)
    g = torch.randn_like(want)
    assert_same_gradients((got * g).sum(), (want * g).sum(),
                          [*block.norm1.named_parameters(), *block.attn.named_parameters()], x)


def test_q_gradient_through_the_bias_alone():
    """With k = 0 every q.k score is 0: the output, and q's whole gradient, come from the
    decomposed bias alone, checked against timm's get_decomposed_rel_pos_bias."""
    heads, d, size = 2, 8, (5, 6)
    n = size[0] * size[1]
    q = torch.randn(1, *size, heads, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, *size, heads, d, dtype=torch.float64)
    tables = [torch.randn(2 * s - 1, d, dtype=torch.float64, requires_grad=True) for s in size]
    got = uk.window_attention(q, torch.zeros_like(q), v, size, 0, None, 0.3, rel_pos=tuple(tables),
                              backend="reference")
    per_head = q[0].permute(2, 0, 1, 3).reshape(heads, n, d)
    bias = sam.get_decomposed_rel_pos_bias(per_head, *tables, size, size)      # (heads, N, N)
    want = (bias.softmax(-1) @ v[0].permute(2, 0, 1, 3).reshape(heads, n, d))
    want = want.reshape(heads, *size, d).permute(1, 2, 0, 3)[None]
    assert_parity("out", got, want, torch.float64)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((got * g).sum(), [q, *tables])
    expected = torch.autograd.grad((want * g).sum(), [q, *tables])
    assert expected[0].abs().sum() > 0
    for name, a, b in zip(("dq", "drel_pos_h", "drel_pos_w"), grads, expected):
        assert_parity(name, a, b, torch.float64)


def test_16_bit_inputs_with_float32_tables():
    """Under autocast the tables stay float32: the bias is formed in the compute dtype."""
    attn = randomised(sam.Attention(32, num_heads=2, use_rel_pos=True, input_size=(6, 5)))
    x = torch.randn(1, 6, 5, 32, dtype=torch.float64)
    qkv = attn.qkv(x).view(1, 6, 5, 3, 2, 16)
    q, k, v = (t.to(torch.bfloat16) for t in qkv.unbind(3))
    tables = (attn.rel_pos_h.float(), attn.rel_pos_w.float())
    got = uk.window_attention(q, k, v, (6, 5), 0, None, attn.scale, rel_pos=tables, backend="reference")
    want = uk.window_attention(*(t.double() for t in (q, k, v)), (6, 5), 0, None, attn.scale,
                               rel_pos=tuple(t.double() for t in tables), backend="reference")
    assert got.dtype == torch.bfloat16
    assert_parity("out", got, want, torch.bfloat16)


@pytest.mark.parametrize("device,backend", backend_cases(include_reference=False))
def test_fused_backends_name_what_they_do_not_run(device, backend):
    q = torch.randn(1, 4, 4, 1, 16, device=device)
    tables = (torch.randn(7, 16, device=device), torch.randn(7, 16, device=device))
    with pytest.raises(uk.BackendUnavailableError, match=r"decomposed relative position \(rel_pos\)"):
        uk.window_attention(q, q, q, 4, rel_pos=tables, backend=backend)


@pytest.mark.parametrize("rel_pos,window,kwargs,error,match", [
    ((torch.randn(7, 8), torch.randn(7, 16)), 4, {}, ValueError, r"rel_pos\[0\] \(rel_pos_h\): expected shape"),
    ((torch.randn(7, 16), torch.randn(9, 16)), 4, {}, ValueError, r"rel_pos\[1\] \(rel_pos_w\): expected shape"),
    ((torch.randn(7, 16, 1), torch.randn(7, 16)), 4, {}, ValueError, r"rel_pos\[0\]"),
    ((torch.randn(7, 16),), 4, {}, TypeError, "rel_pos must be None or a pair"),
    (torch.randn(7, 16), 4, {}, TypeError, "rel_pos must be None or a pair"),
    ((torch.zeros(7, 16, dtype=torch.long), torch.randn(7, 16)), 4, {}, TypeError, r"rel_pos\[0\].*floating"),
    ((torch.randn(7, 16), torch.randn(7, 16)), 4, {"qk_norm": True}, ValueError, "not defined with qk_norm"),
])
def test_bad_rel_pos(rel_pos, window, kwargs, error, match):
    q = torch.randn(1, 4, 4, 1, 16)
    with pytest.raises(error, match=match):
        uk.window_attention(q, q, q, window, rel_pos=rel_pos, backend="reference", **kwargs)


def test_rel_pos_needs_a_2d_window():
    q = torch.randn(1, 2, 4, 4, 1, 16)
    tables = (torch.randn(7, 16), torch.randn(7, 16))
    with pytest.raises(ValueError, match="rel_pos: the decomposed relative position is defined for 2D windows"):
        uk.window_attention(q, q, q, (2, 4, 4), rel_pos=tables, backend="reference")
