"""swap_in(model, depthwise=True) on the CNNs people run, built for real (random weights, small
inputs on the CPU): timm's ConvNeXt V1/V2 (7x7), EfficientNet-B0 (torchvision's, and timm's
TF-'SAME' one at an odd size: 3x3 and 5x5, stride 1 and 2), MobileNetV3 (timm's, its
tf_ minimal variant with Conv2dSame, torchvision's), ConvFormer-S18, torchvision's
ConvNeXt-T, and the plain depthwise 3x3 beside MixNet-M's and CoaT-Lite's grouped modules. Every parameter and
batch-norm statistic is moved off its initial value first (ConvNeXt's layer scale starts at
1e-6, which would hide a wrong convolution). Output, input gradient and every parameter
gradient equal the untouched model's; state_dicts load both ways; swap_out restores. And the
report: depthwise conversion is opt-in, counted in one line without it; what is left alone says
why; modules that are no candidates (dense and pointwise convs) are not listed."""

import copy

import pytest
import torch
from torch import nn

import ultron_kernels as uk
from helpers import assert_checkpoints_load_both_ways, backend_cases, randomise_constants, swap_convnet_and_compare

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

MODELS = {  # name -> (builder, input size)
    "convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 33),
    "tf_mobilenetv3_small_minimal": (lambda: timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False,
                                                               num_classes=10), 33),
    # The rest of the list: ConvNeXt V2 (GRN), TF-'SAME' EfficientNet at an odd size,
    # MobileNetV3 (hard-swish, SE), ConvFormer's 7x7 (MetaFormer), torchvision's MobileNetV3
    # and ConvNeXt, and the plain depthwise 3x3 beside the grouped modules of MixNet-M
    # (MixedConv2d) and CoaT-Lite (ConvRelPosEnc).
    "convnextv2_atto": (lambda: timm.create_model("convnextv2_atto", pretrained=False, num_classes=10), 32),
    "tf_efficientnet_b0": (lambda: timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10), 35),
    "mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10), 33),
    "convformer_s18": (lambda: timm.create_model("convformer_s18", pretrained=False, num_classes=10), 32),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 33),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 32),
    "mixnet_m": (lambda: timm.create_model("mixnet_m", pretrained=False, num_classes=10), 32),
    "coat_lite_mini": (lambda: timm.create_model("coat_lite_mini", pretrained=False, num_classes=10,
                                                 img_size=32), 32),
}
# CI has 25 minutes. Every model runs on the reference backend (the adapters' exactness, in
# float64). The fused backends run the small ones: the CUDA simulation takes about a minute
# for MixNet-M or ConvFormer-S18, Triton's interpreter runs every program in Python (a whole
# EfficientNet takes over a minute); their kernel shapes (7x7, 3x3/5x5 at stride 1 and 2,
# TF-'SAME') are in the small models and the op-level tests (on Triton, one model covers the
# adapter: ConvNeXt-atto took 143 s in the interpreter; the op tests run its 7x7 channels_last).
ON_FUSED = {"triton": {"tf_mobilenetv3_small_minimal"},
            "cuda": {"convnext_atto", "convnextv2_atto", "efficientnet_b0", "tf_efficientnet_b0",
                     "tf_mobilenetv3_small_minimal", "mobilenetv3_small_100", "tv_mobilenet_v3_small"}}


def _build(name):
    build, size = MODELS[name]
    torch.manual_seed(0)
    return randomise_constants(build().eval()), size


def _depthwise_paths(model):
    return [path for path, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and m.groups == m.in_channels == m.out_channels > 1 and m.kernel_size != (1, 1)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("device,backend", backend_cases(devices=("cpu",)))
def test_swapped_model_matches_the_original(name, device, backend):
    if backend != "reference" and name not in ON_FUSED[backend]:
        pytest.skip("covered elsewhere on this backend (CPU emulation time, see ON_FUSED)")
    original, size = _build(name)
    report = swap_convnet_and_compare(original, backend, size, depthwise=True)
    swapped = [path for path, _, _ in report.swapped]
    # Every depthwise conv is converted, itself or inside a converted grouped module.
    assert all(any(path == s or path.startswith(s + ".") for s in swapped) for path in _depthwise_paths(original)), \
        str(report)
    assert not report.skipped, str(report)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dicts_load_both_ways_and_swap_out_restores(name):
    original, size = _build(name)
    swapped = copy.deepcopy(original)
    report = uk.swap_in(swapped, "reference", depthwise=True)
    other, _ = _build(name)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert_checkpoints_load_both_ways(original, swapped, other, size)
    assert uk.swap_out(swapped) == [path for path, _, _ in report.swapped]
    assert not [m for m in swapped.modules() if type(m).__name__.startswith("Ultron")]


def test_without_the_option_the_depthwise_convs_are_counted_in_one_line():
    model, _ = _build("convnext_atto")
    report = uk.swap_in(model, "reference")
    assert not report.swapped and len(report.skipped) == len(_depthwise_paths(model)) == 12
    text = str(report)
    assert "left alone 12 x depthwise Conv2d" in text and "pass depthwise=True" in text
    assert len(text.splitlines()) == 2, text


class _Convs(nn.Module):
    """The depthwise-like convs the op does not take, beside the convs that are no candidates."""

    def __init__(self):
        super().__init__()
        self.multiplier = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect")
        self.scale = nn.Conv2d(4, 4, 1, groups=4)
        self.stride3 = nn.Conv2d(4, 4, 3, stride=3, groups=4)
        self.huge = nn.Conv2d(4, 4, 33, padding=16, groups=4)
        self.dense = nn.Conv2d(4, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fine = nn.Conv2d(4, 4, 5, padding=4, dilation=2, groups=4)
        self.k31 = nn.Conv2d(4, 4, 31, padding=15, groups=4)   # the op's largest kernel


@pytest.mark.parametrize("device,backend", backend_cases(devices=("cpu",)))
def test_what_is_left_alone_says_why_and_non_candidates_are_not_listed(device, backend):
    """The convs the op does not take are left alone, each with its reason; those it takes,
    up to its largest kernel, run after the swap and compute what they did."""
    model = _Convs()
    x = torch.randn(1, 4, 9, 9)
    expected = {name: getattr(model, name)(x).detach() for name in ("fine", "k31")}
    report = uk.swap_in(model, backend, depthwise=True)
    assert [path for path, _, _ in report.swapped] == ["fine", "k31"], str(report)
    reasons = {path: why for path, _, why in report.skipped}
    assert sorted(reasons) == ["huge", "multiplier", "reflect", "scale", "stride3"], str(report)
    assert "kernel (33, 33) (fused: up to 31)" in reasons["huge"]
    assert "depth multiplier 2" in reasons["multiplier"]
    assert "padding_mode 'reflect'" in reasons["reflect"]
    assert "1x1 depthwise" in reasons["scale"]
    assert "stride (3, 3)" in reasons["stride3"]
    for name, want in expected.items():
        torch.testing.assert_close(getattr(model, name)(x), want, rtol=1e-5, atol=1e-5)


def test_recognised_operators_we_do_not_run_are_named_in_one_line():
    """timm's Swin V2-CR attention, and Video Swin's 3D attention on a fused backend when its
    head dim has no kernel (embed_dim 160, one head first: head_dim 160): recognised, left
    alone, one line each with the reason."""
    from torchvision.models.video import SwinTransformer3d

    video = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=160, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
                              window_size=[8, 7, 7])
    for model, backend, kind, why in (
            (video, "cuda", "ShiftedWindowAttention3d", "head_dim 160 is over the fused kernels' 128"),
            (timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False), "auto", "WindowMultiHeadAttention",
             "not supported yet")):
        report = uk.swap_in(model, backend)
        lines = str(report).splitlines()
        assert len(lines) == 2 and kind in lines[1] and why in lines[1], str(report)
        assert len(report.skipped) == 12 and not report.swapped


def test_auto_says_what_it_resolves_to():
    model, _ = _build("convnext_atto")
    text = str(uk.swap_in(model))
    assert text.startswith("swap_in(backend='auto' -> reference on cpu"), text
