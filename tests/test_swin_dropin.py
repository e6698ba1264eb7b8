"""swap_in on the Swin models people run, built for real from timm and torchvision (random
weights, small configurations on the CPU): output, input gradient and every parameter
gradient equal the untouched model's; state_dicts load both ways; swap_out restores."""

import copy

import pytest
import torch

import ultron_kernels as uk
from ultron_kernels.ops.window_attention import MAX_FUSED_WINDOW_TOKENS
from helpers import assert_parity, assert_swapped_model_matches, backend_cases, randomise_constants

timm = pytest.importorskip("timm")
torchvision_swin = pytest.importorskip("torchvision.models.swin_transformer")


def timm_swin(img_size):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size,
                             embed_dim=32, depths=(2, 2), num_heads=(1, 2), num_classes=10)


def timm_swinv2(img_size):
    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=img_size,
                             embed_dim=32, depths=(2, 2), num_heads=(1, 2), num_classes=10)


def torchvision_swin_t(v2=False):
    v2_parts = dict(block=torchvision_swin.SwinTransformerBlockV2,
                    downsample_layer=torchvision_swin.PatchMergingV2) if v2 else {}
    return torchvision_swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                            num_heads=[1, 2], window_size=[8, 8] if v2 else [7, 7],
                                            num_classes=10, **v2_parts)


MODELS = {  # name -> (builder, divisible input size, not divisible, attention class)
    "timm": (timm_swin, 56, 60, "SwinTransformerBlock"),
    "timm-v2": (timm_swinv2, 64, 72, "SwinTransformerV2Block"),
    "torchvision": (lambda size: torchvision_swin_t(), 56, 100, "ShiftedWindowAttention"),
    "torchvision-v2": (lambda size: torchvision_swin_t(v2=True), 64, 100, "ShiftedWindowAttentionV2"),
}


def _original_and_copy(build, size):
    """The library's model (seeded, eval mode) and an untouched deep copy to swap."""
    torch.manual_seed(0)
    original = build(size).eval()
    return original, copy.deepcopy(original)


def _compare(swapped, original, size, dtype, batch=2):
    """The swapped model in ``dtype`` against the original in float64 (helpers; Swin V2's
    logit-scale gradient is held as conditioned: see helpers.assert_parity_or_as_conditioned)."""
    torch.manual_seed(1)
    assert_swapped_model_matches(swapped, original, torch.randn(batch, 3, size, size), torch.randn(batch, 10),
                                 dtype)


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
@pytest.mark.parametrize("device,backend", backend_cases(devices=("cpu",)))
def test_grid_not_divisible_by_the_window(library, device, backend):
    """Padded grids: timm rolls, then pads; torchvision pads, then rolls; both project their
    zero padding with the qkv bias (V2: with its k part zeroed) and do not mask it."""
    build, _, size, attention = MODELS[library]
    original, swapped = _original_and_copy(build, size)
    report = uk.swap_in(swapped, backend)
    assert len(report.swapped) == 4 and not report.skipped, str(report)
    _compare(swapped, original, size, torch.float64 if backend == "reference" else torch.float32)


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


def test_attention_dropout_is_left_alone_with_the_reason():
    for model in (timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                                    embed_dim=32, depths=(2, 2), num_heads=(1, 2), attn_drop_rate=0.1),
                  timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64,
                                    embed_dim=32, depths=(2, 2), num_heads=(1, 2), attn_drop_rate=0.1)):
        report = uk.swap_in(model, "reference")
        assert not report.swapped and len(report.skipped) == 4
        assert all("attention dropout 0.1 > 0" in why for _, _, why in report.skipped)


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


def test_swapped_model_trains_under_ddp(tmp_path):
    """DistributedDataParallel (gloo, one process) over a swapped Swin V2: every parameter is
    reached by the backward (DDP's reducer fails otherwise) and the gradients equal the
    swapped model's own."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        build, size, _, _ = MODELS["timm-v2"]
        _, swapped = _original_and_copy(build, size)
        uk.swap_in(swapped, "triton")
        alone = copy.deepcopy(swapped)
        ddp = DistributedDataParallel(swapped)
        x = torch.randn(2, 3, size, size)
        ddp(x).square().sum().backward()
        alone(x).square().sum().backward()
        for (name, p), (_, q) in zip(swapped.named_parameters(), alone.named_parameters()):
            assert p.grad is not None and torch.equal(p.grad, q.grad), name
    finally:
        dist.destroy_process_group()


# Swin V2 with windows of one tile on the CUDA kernels (16 x 16 = 256 tokens, whose backward
# there streams its tiles) and of several (24 x 24 = 576, timm's
# swinv2_*_window12to24_192to384; both fused backends run up to 4096): (timm name, image size,
# window of stage 1).
AT_THE_LIMIT = {"window16": ("swinv2_tiny_window16_256", 64, 16),
                "window24": ("swinv2_base_window12to24_192to384", 96, 24)}


@pytest.mark.parametrize("name", sorted(AT_THE_LIMIT))
@pytest.mark.parametrize("device,backend", backend_cases(devices=("cpu",)))
def test_a_swapped_model_runs_at_the_window_limit(name, device, backend):
    """A swapped model always runs: windows over a fused backend's token limit are left alone
    there, with the reason, and converted on the others (the reference has no limit); either
    way the model computes what the untouched one does."""
    if (name, backend) == ("window24", "triton"):
        pytest.skip("window16 takes the same multi-block Triton path (CI time: 30-65 s in the interpreter)")
    model_name, size, window = AT_THE_LIMIT[name]

    def build(size):
        return randomise_constants(timm.create_model(model_name, pretrained=False, img_size=size, embed_dim=32,
                                             depths=(2, 2), num_heads=(1, 2), num_classes=10))

    original, swapped = _original_and_copy(build, size)
    report = uk.swap_in(swapped, backend)
    over = backend != "reference" and window * window > MAX_FUSED_WINDOW_TOKENS[backend]
    assert len(report.swapped) + len(report.skipped) == 4, str(report)
    reasons = [why for _, _, why in report.skipped]
    assert sum(f"window ({window}, {window}) has {window * window} tokens" in why for why in reasons) == \
        (2 if over else 0), str(report)
    assert len(report.swapped) == (2 if over else 4), str(report)
    # One image: window 24 is 9 x 9 tile pairs per window and head in the interpreter.
    _compare(swapped, original, size, torch.float64 if backend == "reference" else torch.float32, batch=1)


video_swin = pytest.importorskip("torchvision.models.video.swin_transformer")


def small_video_swin():
    """torchvision's SwinTransformer3d, two stages of two blocks, 4 x 4 x 4 windows."""
    return video_swin.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[1, 2],
                                        window_size=[4, 4, 4], num_classes=10, stochastic_depth_prob=0.0)


# (B, C, T, H, W) clips: divisible by the windows; not (every axis padded, shifted); and
# smaller than the window on every axis of stage 2 (torchvision then shrinks the window and
# takes the corner of the full window's bias: a dense bias here).
CLIPS = {"divisible": (1, 3, 8, 32, 32), "padded": (1, 3, 6, 36, 44), "shrunk": (2, 3, 4, 16, 16)}


@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("device,backend", backend_cases(devices=("cpu",)))
def test_video_swin_matches_torchvision(clip, device, backend):
    """3D windows: the region mask over frames, rows and columns, the 3D bias table and
    torchvision's pad-then-roll on every axis, on every backend."""
    torch.manual_seed(0)
    original = randomise_constants(small_video_swin().eval())
    swapped = copy.deepcopy(original)
    keys = {k: v.shape for k, v in swapped.state_dict().items()}
    report = uk.swap_in(swapped, backend)
    assert {k: v.shape for k, v in swapped.state_dict().items()} == keys
    assert len(report.swapped) == 4 and not report.skipped, str(report)
    assert all(kind.endswith("ShiftedWindowAttention3d (Video Swin)") for _, kind, _ in report.swapped)
    torch.manual_seed(1)
    assert_swapped_model_matches(swapped, original, torch.randn(CLIPS[clip]), torch.randn(CLIPS[clip][0], 10),
                                 torch.float64 if backend == "reference" else torch.float32)


def test_swin3d_t_matches_torchvision_and_loads_state_dicts_both_ways():
    """The real swin3d_t (windows 8 x 7 x 7, shifts 4 x 3 x 3; random weights) on a clip
    divisible by its windows and on one that is not, in float64; checkpoints load both ways."""
    torch.manual_seed(0)
    original = randomise_constants(video_swin.swin3d_t(num_classes=10).eval())
    swapped = copy.deepcopy(original)
    report = uk.swap_in(swapped, "reference")
    assert len(report.swapped) == 12 and not report.skipped, str(report)
    for clip in ((1, 3, 8, 64, 64), (1, 3, 6, 60, 52)):
        torch.manual_seed(1)
        assert_swapped_model_matches(swapped, original, torch.randn(clip), torch.randn(1, 10), torch.float64)
    torch.manual_seed(2)
    other = video_swin.swin3d_t(num_classes=10).eval().double()
    swapped.load_state_dict(other.state_dict())
    original.load_state_dict(swapped.state_dict())
    x = torch.randn(1, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_parity("output after loading", swapped(x), other(x), torch.float64)
        assert torch.equal(original(x), other(x))
