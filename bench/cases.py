"""Benchmark shapes, our backends and the peers, as (name, setup) pairs.

Each ``make_*`` returns a list of Row specs: a callable per variant that runs the forward
(and one for forward+backward), on inputs built once per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import ultron_kernels as uk
from ultron_kernels.ops.dilated_conv import same_padding
from ultron_kernels.reference.window_attention import dense_bias, window_attention_reference

CONV_SHAPES = {  # (B, C, H, W), kernel 3, dilations 1/3/6 over 3 equal groups
    "quick": [(32, 96, 56, 56), (32, 192, 28, 28), (16, 64, 128, 128), (16, 128, 64, 64)],
    "tiny": [(2, 12, 16, 16), (1, 6, 9, 11)],
}
ATTN_SHAPES = {  # (B, H, W, heads, D, window) or (B, T, H, W, heads, D, (wt, wh, ww)), table bias
    "quick": [(32, 56, 56, 4, 32, 7), (32, 28, 28, 8, 32, 7), (16, 28, 28, 10, 32, 7),
              (64, 14, 14, 16, 32, 7), (32, 28, 28, 4, 64, 7), (32, 56, 56, 4, 32, 8),
              # windows of several blocks: Swin V2-B at 384 (window 24, stage 1) and one
              # whole-image window at SAM-B's global-attention shape
              (32, 96, 96, 4, 32, 24), (4, 64, 64, 12, 64, 64),
              # Video Swin (swin3d_t stage 1, a B8 16x224x224 clip)
              (8, 8, 56, 56, 3, 32, (8, 7, 7))],
    "tiny": [(2, 14, 14, 2, 16, 7), (1, 16, 16, 1, 32, 8), (1, 4, 8, 8, 1, 16, (2, 4, 4))],
}
DILATIONS = (1, 3, 6)
# SAM / ViTDet global attention with the decomposed relative position: (B, H, W, heads, D),
# the whole grid one window. SAM-B's and SAM-H's (head dim 80) global blocks at 1024x1024 (a
# 64x64 grid); the lease times the first.
REL_POS_SHAPES = {"quick": [(4, 64, 64, 12, 64), (4, 64, 64, 16, 80)],
                  "tiny": [(1, 6, 7, 2, 16), (2, 5, 4, 1, 32)]}
# timm modules whose split + depthwise convs + cat becomes one grouped depthwise conv: (label,
# timm model, which module, batch, image size). The module's input shape is read from the
# model itself (a forward hook), so the shapes are the real model's.
GROUPED_MODULES = {
    "quick": [("MixNet-S mixed dw s1", "mixnet_s", "mixed-s1", 128, 224),
              ("MixNet-S mixed dw s2", "mixnet_s", "mixed-s2", 128, 224),
              ("InceptionNeXt-T token mixer stage 1", "inception_next_tiny", "inception", 128, 224)],
    "tiny": [("MixNet-S mixed dw s2", "mixnet_s", "mixed-s2", 1, 32),
             ("InceptionNeXt-T token mixer stage 1", "inception_next_tiny", "inception", 1, 32)],
}
# Plain depthwise convs of the CNNs people run, one layer each: (label, B, C, H, W, kernel,
# stride). The peer is what those models call: F.conv2d with groups=C (cuDNN on a GPU).
DEPTHWISE_LAYERS = {
    "quick": [("ConvNeXt-T stage-1 dw 7x7", 128, 96, 56, 56, 7, 1),
              ("EfficientNet-B0 stage-3 dw 5x5 s2", 128, 144, 56, 56, 5, 2),
              ("RepLKNet-31B stage-1 dw 31x31", 64, 128, 56, 56, 31, 1),
              ("UniRepLKNet-S stage-3 dw 13x13", 64, 384, 14, 14, 13, 1)],
    "tiny": [("dw 7x7", 2, 8, 12, 13, 7, 1), ("dw 5x5 s2", 2, 8, 13, 12, 5, 2), ("dw 13x13", 1, 4, 17, 18, 13, 1)],
}


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    layout: str
    floor_bytes_fwd: int
    floor_bytes_fwd_bwd: int
    variants: dict[str, Callable] = field(default_factory=dict)
    inputs: list = field(default_factory=list)   # input sets, rotated between calls
    compiled: set = field(default_factory=set)   # the variants that are torch.compile'd (slow first call)


def rotate(sets: list, build: Callable) -> Callable:
    """A callable that runs ``build(*inputs)`` on the next input set each call (so that
    repeated calls do not all hit L2)."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(sets)
        return build(*sets[state["i"]])
    return run


def fwd_bwd(forward: Callable) -> Callable:
    """Forward then the gradients of every input (torch.autograd.grad: nothing accumulates
    into .grad between timed calls)."""
    def run(*inputs):
        out = forward(*inputs)
        return torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def _input_sets(make: Callable, bytes_per_set: int, device) -> list:
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    count = max(1, min(8, math.ceil(3 * l2 / max(bytes_per_set, 1))))
    return [make() for _ in range(count)]


def conv_cases(shapes: Sequence[tuple], dtype: torch.dtype, device: torch.device) -> list[Case]:
    """Cases for ``shapes`` (entries of CONV_SHAPES), both layouts."""
    cases = []
    backends = [b for b, why in uk.available_backends(device).items() if why == "available"]
    for b, c, h, w in shapes:
        for layout in ("nchw", "nhwc"):
            elt = torch.tensor([], dtype=dtype).element_size()
            act = b * c * h * w * elt

            def make(b=b, c=c, h=h, w=w, layout=layout):
                x = torch.randn(b, c, h, w, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                weight = (torch.randn(c, 1, 3, 3, device=device, dtype=dtype) / 3)
                bias = torch.randn(c, device=device, dtype=dtype)
                return [t.requires_grad_() for t in (x, weight, bias)]

            case = Case("channelwise_dilated_conv2d", f"B{b} C{c} {h}x{w} k3 d1/3/6", dtype, layout,
                        2 * act, 5 * act)
            case.inputs = _input_sets(make, act, device)
            width = c // len(DILATIONS)

            def split_conv_cat(x, weight, bias, width=width):  # bound now: runs after the loop
                xs, ws, bs = x.split(width, 1), weight.split(width, 0), bias.split(width, 0)
                return torch.cat([F.conv2d(xi, wi, bi, 1, same_padding(d, 3), d, width)
                                  for xi, wi, bi, d in zip(xs, ws, bs, DILATIONS)], 1)

            def ours(backend):
                return lambda x, weight, bias: uk.channelwise_dilated_conv2d(
                    x, weight, bias, DILATIONS, backend=backend)

            variants = {"peer: split+conv+cat": split_conv_cat}
            if device.type == "cuda":
                variants["peer: split+conv+cat compiled"] = torch.compile(split_conv_cat)
                case.compiled.add("peer: split+conv+cat compiled")
            variants.update({f"ours: {name}": ours(name) for name in backends})
            for name, fn in variants.items():
                case.variants[name] = fn
            cases.append(case)
    return cases


def depthwise_cases(layers: Sequence[tuple], dtype: torch.dtype, device: torch.device) -> list[Case]:
    """Cases for ``layers`` (entries of DEPTHWISE_LAYERS), both layouts: F.conv2d with
    groups=C (eager, and compiled on a GPU) against the grouped op with one group ('same'
    padding as the models use: k // 2 each side)."""
    cases = []
    backends = [b for b, why in uk.available_backends(device).items() if why == "available"]
    for label, b, c, h, w, k, stride in layers:
        elt = torch.tensor([], dtype=dtype).element_size()
        ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
        act_in, act_out = b * c * h * w * elt, b * c * ho * wo * elt
        for layout in ("nchw", "nhwc"):
            def make(b=b, c=c, h=h, w=w, k=k, layout=layout):
                x = torch.randn(b, c, h, w, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                weight = torch.randn(c, 1, k, k, device=device, dtype=dtype) / k
                bias = torch.randn(c, device=device, dtype=dtype)
                return [t.requires_grad_() for t in (x, weight, bias)]

            # Floors: read x, write y; backward reads dy and x, writes dx (the weights are small).
            case = Case(f"depthwise conv {label}", f"B{b} C{c} {h}x{w} k{k} s{stride}", dtype, layout,
                        act_in + act_out, 3 * act_in + 2 * act_out)
            case.inputs = _input_sets(make, act_in, device)

            def cudnn(x, weight, bias, k=k, stride=stride):
                return F.conv2d(x, weight, bias, stride, k // 2, 1, x.shape[1])

            def ours(backend, k=k, stride=stride):
                return lambda x, weight, bias: uk.grouped_depthwise_conv2d(
                    x, [weight], [uk.DepthwiseGroup(x.shape[1], k, padding=k // 2)], [bias], stride, backend=backend)

            case.variants["peer: F.conv2d"] = cudnn
            if device.type == "cuda":
                case.variants["peer: F.conv2d compiled"] = torch.compile(cudnn)
                case.compiled.add("peer: F.conv2d compiled")
            case.variants.update({f"ours: {name}": ours(name) for name in backends})
            cases.append(case)
    return cases


def attention_cases(shapes: Sequence[tuple], dtype: torch.dtype, device: torch.device,
                    cosine: bool = False) -> list[Case]:
    """Cases for ``shapes`` (entries of ATTN_SHAPES). ``cosine``: Swin V2's
    attention (q and k L2-normalised, a per-head logit scale with its gradient) at the same
    shapes, so that its rows compare with the plain ones."""
    cases = []
    backends = [b for b, why in uk.available_backends(device).items() if why == "available"]
    for b, *grid, heads, d, window in shapes:
        window = tuple(window) if isinstance(window, tuple) else (window, window)
        n = math.prod(window)
        elt = torch.tensor([], dtype=dtype).element_size()
        act = b * math.prod(grid) * heads * d * elt

        def make(b=b, grid=tuple(grid), heads=heads, d=d, window=window):
            qkv = torch.randn(b, *grid, 3, heads, d, device=device, dtype=dtype)
            table = torch.randn(math.prod([2 * w - 1 for w in window]), heads, device=device,
                                dtype=torch.float32) * 0.1
            extra = [torch.full((heads,), 10.0, device=device)] if cosine else []  # exp(log 10)
            return [t.requires_grad_() for t in (*qkv.unbind(-3), table, *extra)]

        op = "window_attention cosine" if cosine else "window_attention"
        label = f"B{b} {'x'.join(map(str, grid))} h{heads} d{d} w{'x'.join(map(str, window))}"
        case = Case(op, label, dtype, "-", 4 * act, 12 * act)
        case.inputs = [[t.detach().requires_grad_() for t in s]
                       for s in _input_sets(make, 3 * act, device)]

        # Shape values are bound as defaults: the variants run after this loop has moved on.
        def eager(q, k, v, table, scale=None, window=window, d=d):
            return window_attention_reference(q, k, v, window, (0,) * len(window), table,
                                              d ** -0.5 if scale is None else scale, cosine)

        def partition(t, window=window, n=n):
            """(B, *grid, heads, D) -> (B * windows, heads, N, D)."""
            grid, axes = t.shape[1:-2], len(window)
            split = [size for g, w in zip(grid, window) for size in (g // w, w)]
            t = t.reshape(t.shape[0], *split, *t.shape[-2:])
            order = [0, *range(1, 2 * axes, 2), 2 * axes + 1, *range(2, 2 * axes + 1, 2), 2 * axes + 2]
            return t.permute(order).reshape(-1, t.shape[-2], n, t.shape[-1])

        def queries_keys(q, k, scale, d=d):
            """Partitioned q (scaled) and k, and the scale SDPA/flex then apply."""
            if scale is None:
                return partition(q), partition(k), d ** -0.5
            q, k = F.normalize(partition(q), dim=-1), F.normalize(partition(k), dim=-1)
            return q * scale.view(-1, 1, 1).to(q.dtype), k, 1.0

        def sdpa(q, k, v, table, scale=None, window=window, heads=heads):
            bias = dense_bias(table, window, heads).to(q.dtype)[None]
            q, k, factor = queries_keys(q, k, scale)
            out = F.scaled_dot_product_attention(q, k, partition(v), attn_mask=bias, scale=factor)
            return out  # kept partitioned: the reverse copy would only add to the peer's time

        variants = {"peer: eager": eager}
        if device.type == "cuda":
            variants["peer: eager compiled"] = torch.compile(eager)
            case.compiled.add("peer: eager compiled")
            variants["peer: sdpa+bias"] = sdpa
            try:
                from torch.nn.attention.flex_attention import flex_attention

                def flex_peer(q, k, v, table, scale=None, window=window, heads=heads):
                    # Compiled as a whole (score_mod included), as FlexAttention is meant to
                    # be used: one graph, no recompilation per call.
                    bias = dense_bias(table, window, heads)

                    def score_mod(score, bi, hi, qi, ki):
                        return score + bias[hi, qi, ki]
                    q, k, factor = queries_keys(q, k, scale)
                    return flex_attention(q, k, partition(v), score_mod=score_mod, scale=factor)
                variants["peer: flex(partitioned)"] = torch.compile(flex_peer)
                case.compiled.add("peer: flex(partitioned)")
            except ImportError as exc:
                print(f"skipping FlexAttention peer: {exc}")
        for name in backends:
            variants[f"ours: {name}"] = (lambda name, window: lambda q, k, v, table, scale=None: uk.window_attention(
                q, k, v, window, 0, table, scale, qk_norm=cosine, backend=name))(name, window)
        case.variants = variants
        cases.append(case)
    return cases


def cosine_attention_cases(shapes: Sequence[tuple], dtype: torch.dtype, device: torch.device) -> list[Case]:
    return attention_cases(shapes, dtype, device, cosine=True)


def rel_pos_cases(shapes: Sequence[tuple], dtype: torch.dtype, device: torch.device) -> list[Case]:
    """Global attention with SAM's decomposed relative position (entries of REL_POS_SHAPES):
    timm's own way (the (B*heads, N, N) bias materialised, then SDPA with it as the mask),
    eager softmax with the same bias, FlexAttention with the per-query rows captured by a
    score_mod (on a GPU), against window_attention(rel_pos=...) on each backend. Every variant
    takes (B, H, W, heads, D) q, k, v and both tables, and returns the (B, H, W, heads, D)
    output; the bench reports each one's peak memory beside its time."""
    cases = []
    backends = [b for b, why in uk.available_backends(device).items() if why == "available"]
    for b, h, w, heads, d in shapes:
        n = h * w
        elt = torch.tensor([], dtype=dtype).element_size()
        act = b * n * heads * d * elt

        def make(b=b, h=h, w=w, heads=heads, d=d):
            qkv = torch.randn(b, h, w, 3, heads, d, device=device, dtype=dtype)
            tables = [torch.randn(2 * size - 1, d, device=device, dtype=dtype) * 0.05 for size in (h, w)]
            return [t.requires_grad_() for t in (*qkv.unbind(3), *tables)]

        case = Case("window_attention rel_pos (global)", f"B{b} {h}x{w} h{heads} d{d}", dtype, "-", 4 * act, 12 * act)
        case.inputs = [[t.detach().requires_grad_() for t in s] for s in _input_sets(make, 3 * act, device)]

        def heads_first(t, n=n):
            """(B, H, W, heads, D) -> (B, heads, N, D)."""
            return t.flatten(1, 2).transpose(1, 2)

        def grid_last(out, h=h, w=w):
            """(B, heads, N, D) -> (B, H, W, heads, D)."""
            return out.transpose(1, 2).unflatten(1, (h, w))

        def per_query_rows(q, rel_h, rel_w, h=h, w=w):
            """timm's get_decomposed_rel_pos_bias terms: each query's products with the
            relative rows of its key rows (B, heads, H, W, H) and key columns (..., W)."""
            rows_h = rel_h[torch.arange(h, device=q.device)[:, None] - torch.arange(h, device=q.device) + h - 1]
            rows_w = rel_w[torch.arange(w, device=q.device)[:, None] - torch.arange(w, device=q.device) + w - 1]
            r_q = q.permute(0, 3, 1, 2, 4)  # (B, heads, H, W, D)
            return (torch.einsum("bnhwc,hkc->bnhwk", r_q, rows_h), torch.einsum("bnhwc,wkc->bnhwk", r_q, rows_w))

        def mask(q, rel_h, rel_w, n=n, per_query_rows=per_query_rows):
            """The (B, heads, N, N) bias timm materialises for SDPA."""
            along_h, along_w = per_query_rows(q, rel_h, rel_w)
            return (along_h[..., :, None] + along_w[..., None, :]).reshape(q.shape[0], q.shape[3], n, n)

        # The helpers are bound as defaults too: the variants run after this loop has moved on.
        def timm_sdpa(q, k, v, rel_h, rel_w, mask=mask, heads_first=heads_first, grid_last=grid_last):
            bias = mask(q, rel_h, rel_w).to(q.dtype)
            return grid_last(F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                                            attn_mask=bias))

        def eager(q, k, v, rel_h, rel_w, d=d, mask=mask, heads_first=heads_first, grid_last=grid_last):
            scores = heads_first(q) @ heads_first(k).transpose(-1, -2) * d ** -0.5 + mask(q, rel_h, rel_w)
            return grid_last(scores.float().softmax(-1).to(q.dtype) @ heads_first(v))

        def ours(backend, h=h, w=w):
            return lambda q, k, v, rel_h, rel_w: uk.window_attention(q, k, v, (h, w), 0, None, None,
                                                                     rel_pos=(rel_h, rel_w), backend=backend)

        case.variants.update({"peer: eager": eager, "peer: timm SDPA + mask": timm_sdpa})
        if device.type == "cuda":
            try:
                from torch.nn.attention.flex_attention import flex_attention
            except ImportError:  # an older torch: no FlexAttention peer
                flex_attention = None
            if flex_attention is not None:
                def flex_peer(q, k, v, rel_h, rel_w, w=w, per_query_rows=per_query_rows, heads_first=heads_first,
                              grid_last=grid_last):
                    along_h, along_w = (t.flatten(2, 3) for t in per_query_rows(q, rel_h, rel_w))

                    def score_mod(score, bi, hi, qi, ki):
                        return score + along_h[bi, hi, qi, ki // w] + along_w[bi, hi, qi, ki % w]
                    return grid_last(flex_attention(heads_first(q), heads_first(k), heads_first(v),
                                                    score_mod=score_mod))

                case.variants["peer: FlexAttention (compiled)"] = torch.compile(flex_peer)
                case.compiled.add("peer: FlexAttention (compiled)")
        case.variants.update({f"ours: {name}": ours(name) for name in backends})
        cases.append(case)
    return cases


def _first_module(model: torch.nn.Module, which: str) -> torch.nn.Module:
    """The model's first depthwise MixedConv2d of stride 1 ("mixed-s1") or 2 ("mixed-s2") with
    more than two kernel sizes where it has one, or its first InceptionDWConv2d."""
    def fits(m, groups):
        if which == "inception":
            return type(m).__name__ == "InceptionDWConv2d"
        convs = list(m.values()) if type(m).__name__ == "MixedConv2d" else []
        return (bool(convs) and len(convs) >= groups and all(c.groups == c.in_channels for c in convs)
                and convs[0].stride[0] == int(which[-1]))
    for groups in (3, 2):
        found = [m for m in model.modules() if fits(m, groups)]
        if found:
            return found[0]
    raise LookupError(f"no {which} module")


def grouped_conv_cases(shapes: Sequence[tuple], dtype: torch.dtype, device: torch.device) -> list[Case]:
    """timm's split + depthwise convs + cat modules as they are (the peers: eager, and compiled
    on a GPU) against the same module swapped in to each available backend, both layouts."""
    import copy

    import timm

    cases = []
    backends = [b for b, why in uk.available_backends(device).items() if why == "available"]
    for label, model_name, which, batch, size in shapes:
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False).eval()
        module = _first_module(model, which)
        seen = {}
        hook = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].shape, y=out.shape))
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
        hook.remove()
        module = module.to(device=device, dtype=dtype)
        (_, c, h, w), (_, _, ho, wo) = seen["x"], seen["y"]
        elt = torch.tensor([], dtype=dtype).element_size()
        act_in, act_out = batch * c * h * w * elt, batch * c * ho * wo * elt
        params = dict(module.named_parameters())

        def with_weights(m, names=tuple(params)):
            return lambda x, *weights: torch.func.functional_call(m, dict(zip(names, weights)), (x,))

        swapped = {}
        for backend in backends:
            swapped[backend] = copy.deepcopy(module)
            uk.swap_in(swapped[backend], backend)
        for layout in ("nchw", "nhwc"):
            def make(c=c, h=h, w=w, layout=layout):
                x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                # The weights are inputs too, so that forward+backward computes their gradients.
                return [x.requires_grad_()] + [p.detach().clone().requires_grad_() for p in params.values()]

            # Floors: read x, write y; backward reads dy and x, writes dx (the weights are small).
            case = Case(f"grouped_depthwise_conv2d {label}", f"B{batch} C{c} {h}x{w} -> {ho}x{wo}", dtype,
                        layout, act_in + act_out, 3 * act_in + 2 * act_out)
            case.inputs = _input_sets(make, act_in, device)
            variants = {"peer: timm split+conv+cat": with_weights(module)}
            if device.type == "cuda":
                variants["peer: timm split+conv+cat compiled"] = torch.compile(with_weights(module))
                case.compiled.add("peer: timm split+conv+cat compiled")
            variants.update({f"ours: {name}": with_weights(swapped[name]) for name in backends})
            case.variants.update(variants)
            cases.append(case)
    return cases
