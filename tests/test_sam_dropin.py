"""swap_in on timm's Segment Anything encoder (vision_transformer_sam), built for real in a
small config that keeps SAM's structure: window 14 on a 20 x 20 grid (not divisible by 14, so
the windowed blocks pad) and two global blocks, every constant-initialised parameter moved off
its constant first (the rel-pos tables start at zero, which would hide a wrong bias). Output,
input gradient and every parameter gradient equal the untouched model's in float64; state
dicts load both ways; tables of another length are resized as timm resizes them; and the
report says why attention is left alone where the op cannot take it."""

import copy

import pytest
import torch
from torch import nn

import ultron_kernels as uk
from helpers import assert_checkpoints_load_both_ways, assert_parity, randomise_constants, swap_convnet_and_compare

timm = pytest.importorskip("timm")
sam = pytest.importorskip("timm.models.vision_transformer_sam")

SIZE = 320  # a 20 x 20 grid of 16-pixel patches


def _samvit(size: int = SIZE, depth: int = 4):
    """Blocks alternate windowed and global (global_attn_indexes 1, 3, ...)."""
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=size, embed_dim=32, depth=depth,
                              num_heads=2, window_size=14, global_attn_indexes=tuple(range(1, depth, 2)), neck_chans=16,
                              num_classes=10, global_pool="avg")
    return randomise_constants(model.eval())


@pytest.mark.parametrize("backend,size,depth", [("reference", SIZE, 4), ("triton", 256, 2), ("cuda", 256, 2)])
def test_swapped_samvit_matches_the_original(backend, size, depth):
    """float64 on the reference; float32 on Triton and CUDA (the interpreter and the host
    simulation on the CPU, so a 16 x 16 grid, still padded to two windows a side, and one
    block of each kind): the windowed blocks' 196-token windows and the global blocks' 256
    tokens span several key blocks (Triton) and take the SIMT kernels (CUDA)."""
    if uk.available_backends("cpu").get(backend) != "available":
        pytest.skip(f"{backend} does not run here")
    original = _samvit(size, depth)
    assert [b.window_size for b in original.blocks] == [14, 0] * (depth // 2)
    report = swap_convnet_and_compare(original, backend, size)
    assert [path for path, _, _ in report.swapped] == [f"blocks.{i}.attn" for i in range(depth)], str(report)
    assert not report.skipped, str(report)
    notes = [note for _, _, note in report.swapped]
    grid = size // 16
    assert "14x14 windows" in notes[0] and f"{grid}x{grid} windows" in notes[1], notes


def test_state_dicts_load_both_ways_and_swap_out_restores():
    original = _samvit()
    swapped = copy.deepcopy(original)
    report = uk.swap_in(swapped, "reference")
    other = _samvit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert_checkpoints_load_both_ways(original, swapped, other, SIZE)
    assert uk.swap_out(swapped) == [path for path, _, _ in report.swapped]


def test_tables_of_another_length_are_resized_as_timm_resizes_them():
    """Tables made for 7 x 9 windows, called on a 5 x 6 input: timm interpolates them per call
    (get_rel_pos); so does the adapter, before the op."""
    torch.manual_seed(0)
    attn = randomise_constants(sam.Attention(32, num_heads=2, use_rel_pos=True, input_size=(7, 9))).double()
    swapped = copy.deepcopy(attn)
    assert uk.swap_in(swapped, "reference").swapped
    x = torch.randn(2, 5, 6, 32, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, 32, dtype=torch.float64)
    results = []
    for module in (attn, swapped):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        results.append((out, *torch.autograd.grad(out, (inputs, module.rel_pos_h, module.rel_pos_w), grad)))
    for name, got, want in zip(("out", "dx", "d rel_pos_h", "d rel_pos_w"), results[1], results[0]):
        assert_parity(name, got, want, torch.float32)


def test_what_is_left_alone_says_why():
    torch.manual_seed(0)
    plain = nn.ModuleDict({
        "rel_pos": sam.Attention(32, num_heads=2, use_rel_pos=True, input_size=(4, 4)),
        "qk_norm": sam.Attention(32, num_heads=2, qk_norm=True, use_rel_pos=True, input_size=(4, 4)),
        "none": sam.Attention(32, num_heads=2),
        "rope": sam.Attention(32, num_heads=2),
    })
    plain["rope"].rope = nn.Identity()  # stands for timm's rotary embedding module
    for backend in ("reference", "auto", "triton", "cuda"):
        model = copy.deepcopy(plain)
        report = uk.swap_in(model, backend)
        assert [path for path, _, _ in report.swapped] == ["rel_pos"], (backend, str(report))
        reasons = {path: why for path, _, why in report.skipped}
        assert "not the op's cosine qk_norm" in reasons["qk_norm"]
        assert "timm's SDPA already runs this attention fused" in reasons["none"]
        assert "(RoPE) is not supported" in reasons["rope"]


def test_what_the_fused_kernels_cannot_run_is_left_on_timms_path():
    """A head dim over 128, and a global block over 4096 tokens (a 1536-pixel input): Triton
    and CUDA leave them with the limit named; "auto" converts them (its per-call choice is
    then the reference, which keeps timm's memory)."""
    plain = nn.ModuleDict({"d160": sam.Attention(320, num_heads=2, use_rel_pos=True, input_size=(4, 4)),
                           "96x96": sam.Attention(32, num_heads=2, use_rel_pos=True, input_size=(96, 96))})
    for backend in ("triton", "cuda"):
        report = uk.swap_in(copy.deepcopy(plain), backend)
        reasons = {path: why for path, _, why in report.skipped}
        assert "head_dim 160 is over the fused kernels' 128" in reasons["d160"]
        assert "window (96, 96) has 9216 tokens" in reasons["96x96"]
        assert not report.swapped
    assert [path for path, _, _ in uk.swap_in(copy.deepcopy(plain), "auto").swapped] == ["d160", "96x96"]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sam_h_head_dim_runs_fused(backend):
    """SAM-H's attention (head_dim 80: 1280 channels over 16 heads) converts on the fused
    backends: Triton runs it in 128-wide tiles with the padding columns masked. A global block
    over a 6 x 7 grid with two heads of 80, in float32: output, input gradient and every
    parameter's gradient (qkv, proj, both tables) against timm's own attention, whose state
    dict keys the swap keeps."""
    if uk.available_backends("cpu").get(backend) != "available":
        pytest.skip(f"{backend} does not run here")
    torch.manual_seed(0)
    attn = randomise_constants(sam.Attention(160, num_heads=2, use_rel_pos=True, input_size=(6, 7)))
    swapped = copy.deepcopy(attn)
    report = uk.swap_in(swapped, backend)
    assert [path for path, _, _ in report.swapped] == [""], str(report)
    assert list(swapped.state_dict()) == list(attn.state_dict())
    x = torch.randn(2, 6, 7, 160)
    grad = torch.randn(2, 6, 7, 160)
    names = ["out", "dx", *(f"d {name}" for name, _ in attn.named_parameters())]
    results = []
    for module in (attn.double(), swapped):
        inputs = (x.double() if module is attn else x).clone().requires_grad_()
        out = module(inputs)
        results.append((out, *torch.autograd.grad(out, (inputs, *module.parameters()), grad.to(out.dtype))))
    assert len(results[1]) == len(names) == 2 + 6
    for name, got, want in zip(names, results[1], results[0]):
        assert_parity(name, got, want, torch.float32)
