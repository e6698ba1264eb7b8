"""swap_in on the Swin models people run, built for real from timm and torchvision (random
weights, small configurations on the CPU): output, input gradient and every parameter
gradient equal the untouched model's; state_dicts load both ways; swap_out restores."""

import copy

import pytest
import torch

import ultron_kernels as uk
from helpers import assert_parity, backend_cases

timm = pytest.importorskip("timm")
torchvision_swin = pytest.importorskip("torchvision.models.swin_transformer")


def timm_swin(img_size):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size,
                             embed_dim=32, depths=(2, 2), num_heads=(1, 2), num_classes=10)


def torchvision_swin_t():
    return torchvision_swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                            num_heads=[1, 2], window_size=[7, 7], num_classes=10)


MODELS = {  # name -> (builder, divisible input size, not divisible, attention class)
    "timm": (lambda size: timm_swin(size), 56, 60, "SwinTransformerBlock"),
    "torchvision": (lambda size: torchvision_swin_t(), 56, 100, "ShiftedWindowAttention"),
}


def _original_and_copy(build, size):
    """The library's model (seeded, eval mode) and an untouched deep copy to swap."""
    torch.manual_seed(0)
    original = build(size).eval()
    return original, copy.deepcopy(original)


def _step(model, x, grad):
    x = x.detach().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _compare(swapped, original, size, dtype):
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    grad = torch.randn(2, 10)
    want = _step(original.double(), x.double(), grad.double())
    got = _step(swapped.to(dtype), x.to(dtype), grad.to(dtype))
    assert_parity("output", got[0], want[0], dtype)
    assert_parity("input grad", got[1], want[1], dtype)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert_parity(f"grad {name}", got[2][name], want[2][name], dtype)


@pytest.mark.parametrize("library", sorted(MODELS))
@pytest.mark.parametrize("device,backend", backend_cases(devices=("cpu",)))
def test_swapped_model_matches_the_original(library, device, backend):
    build, size, _, attention = MODELS[library]
    original, swapped = _original_and_copy(build, size)
    keys = {k: v.shape for k, v in swapped.state_dict().items()}
    report = uk.swap_in(swapped, backend)
    assert len(report.swapped) == 4 and not report.skipped, str(report)
    assert all(kind.endswith(attention) for _, kind, _ in report.swapped), str(report)
    assert {k: v.shape for k, v in swapped.state_dict().items()} == keys
    _compare(swapped, original, size, torch.float64 if backend == "reference" else torch.float32)


@pytest.mark.parametrize("library", sorted(MODELS))
def test_grid_not_divisible_by_the_window_keeps_the_librarys_path(library):
    """timm rolls before padding; torchvision's padded keys take the qkv bias: neither is
    the op's order yet (issue #13), so such grids run the library's own code, exactly."""
    build, _, size, _ = MODELS[library]
    original, swapped = _original_and_copy(build, size)
    report = uk.swap_in(swapped, "triton")
    assert "not divisible" in str(report)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(swapped(x), original(x))


@pytest.mark.parametrize("library", sorted(MODELS))
def test_state_dicts_load_both_ways_and_swap_out_restores(library):
    build, size, _, attention = MODELS[library]
    original, swapped = _original_and_copy(build, size)
    uk.swap_in(swapped, "reference")
    torch.manual_seed(2)
    other = build(size).eval()
    swapped.load_state_dict(other.state_dict())   # a checkpoint of the library's model
    original.load_state_dict(swapped.state_dict())  # a checkpoint saved after the swap
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert_parity("output after loading", swapped(x), other.double()(x.double()), torch.float32)
    restored = uk.swap_out(swapped)
    assert len(restored) == 4
    assert all(type(m).__name__ != f"Ultron{attention}" for m in swapped.modules())
    with torch.no_grad():
        assert torch.equal(swapped(x), original(x))


def test_attention_dropout_and_swin_v2_are_left_alone_with_reasons():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                              embed_dim=32, depths=(2, 2), num_heads=(1, 2), attn_drop_rate=0.1)
    report = uk.swap_in(model, "reference")
    assert not report.swapped and len(report.skipped) == 4
    assert all("attention dropout" in why for _, _, why in report.skipped)
    v2 = torchvision_swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[1],
                                          window_size=[8, 8], block=torchvision_swin.SwinTransformerBlockV2,
                                          downsample_layer=torchvision_swin.PatchMergingV2)
    report = uk.swap_in(v2, "reference")
    assert not report.swapped and report.skipped and all("cosine" in why for _, _, why in report.skipped)


def test_swapped_model_deep_copies_and_pickles():
    import io

    torch.manual_seed(0)
    model = timm_swin(56).eval()
    uk.swap_in(model, "reference")
    x = torch.randn(1, 3, 56, 56)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(clone.layers[0].blocks[0]).__name__ == "UltronSwinTransformerBlock"
        with torch.no_grad():
            assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("library", sorted(MODELS))
def test_swapped_model_compiles_without_graph_breaks_and_runs_under_autocast(library):
    build, size, _, _ = MODELS[library]
    original, swapped = _original_and_copy(build, size)
    uk.swap_in(swapped, "triton")
    x = torch.randn(2, 3, size, size)
    want = original.double()(x.double()).detach()
    # fullgraph=True: a graph break anywhere (our op included) is an error.
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_parity("compiled output", compiled(x), want, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = swapped(x)
    assert out.dtype == torch.bfloat16
    assert_parity("autocast output", out, want, torch.bfloat16)
