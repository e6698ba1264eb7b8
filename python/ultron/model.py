"""The ULTRON network, built from ultron_kernels modules (backend chosen per build)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ultron_kernels.nn import ChannelwiseDilatedConv2d, WindowAttention

from ultron.configs import TOTAL_STRIDE


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) as a view (channels_last when x is contiguous)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        super().__init__(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


class ConvBlock(nn.Module):
    """Channel-wise dilated depthwise conv -> LN -> MLP -> layer scale -> residual."""

    def __init__(self, dim, dilations, mlp_ratio, drop_path, layer_scale_init, backend):
        super().__init__()
        self.dwconv = ChannelwiseDilatedConv2d(dim, 3, dilations, backend=backend)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        y = _nhwc(self.dwconv(_nchw(x)))
        return x + self.drop_path(self.gamma * self.mlp(self.norm(y)))


class LocalTransformerBlock(nn.Module):
    """LN -> qkv -> key context (k += dwconv3x3(k)) -> value update (v += dilated conv(v))
    -> window attention -> proj -> residual; LN -> MLP -> residual."""

    def __init__(self, dim, heads, window, shift, dilations, mlp_ratio, drop_path,
                 layer_scale_init, backend):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, shift, backend=backend)
        self.key_context = ChannelwiseDilatedConv2d(dim, 3, 1, backend=backend)
        self.value_update = ChannelwiseDilatedConv2d(dim, 3, dilations, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        heads = self.attn.num_heads
        qkv = self.attn.qkv(self.norm1(x)).view(b, h, w, 3, c)
        q, k, v = qkv.unbind(3)  # strided (B, H, W, C) views, channels innermost
        # The convs read the views as channels_last NCHW tensors: no permute copies.
        k = k + _nhwc(self.key_context(_nchw(k)))
        v = v + _nhwc(self.value_update(_nchw(v)))
        split = (b, h, w, heads, c // heads)
        attn = self.attn.attend(q.reshape(split), k.reshape(split), v.reshape(split))
        x = x + self.drop_path(self.gamma1 * self.attn.proj(attn.reshape(b, h, w, c)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """LN + 2x2 stride-2 conv."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc(self.conv(_nchw(self.norm(x)).contiguous(memory_format=torch.channels_last)))


class AttentionPoolHead(nn.Module):
    """A GeM-pooled descriptor (learnable p) queries the feature map (softmax over
    positions); the attended feature -> FC -> L2-normalised global descriptor."""

    def __init__(self, dim: int, out_dim: int, gem_p: float = 3.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.p = nn.Parameter(torch.tensor(gem_p))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        f = self.norm(x).flatten(1, 2)                    # (B, HW, C)
        p = self.p.clamp(min=1.0)
        gem = f.float().clamp(min=1e-6).pow(p).mean(1).pow(1.0 / p).to(f.dtype)
        scores = torch.einsum("bc,bnc->bn", self.query(gem), self.key(f)) / math.sqrt(f.shape[-1])
        pooled = torch.einsum("bn,bnc->bc", scores.softmax(-1).to(f.dtype), f)
        return F.normalize(self.fc(pooled).float(), dim=-1)


class ArcFaceHead(nn.Module):
    """Cosine classifier with an additive angular margin on the target class (training)."""

    def __init__(self, dim: int, num_classes: int, scale: float, margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.scale, self.margin = scale, margin

    def forward(self, descriptor: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = descriptor.float() @ F.normalize(self.weight.float(), dim=-1).t()
        if labels is None:
            return self.scale * cosine
        theta = torch.acos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))
        target = F.one_hot(labels, cosine.shape[1]).bool()
        return self.scale * torch.where(target, torch.cos(theta + self.margin), cosine)


class Ultron(nn.Module):
    def __init__(self, dims, depths, heads, window, dilations, descriptor_dim, in_chans,
                 num_classes, mlp_ratio, drop_path, layer_scale_init, arcface_scale,
                 arcface_margin, backend="reference", image_size=None):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, dims[0], 4, 4)
        self.stem_norm = nn.LayerNorm(dims[0])
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages, self.downsamples = nn.ModuleList(), nn.ModuleList()
        block = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            blocks = []
            for j in range(depth):
                if i < 2:
                    blocks.append(ConvBlock(dim, dilations, mlp_ratio, rates[block],
                                            layer_scale_init, backend))
                else:
                    shift = 0 if j % 2 == 0 else window // 2
                    blocks.append(LocalTransformerBlock(dim, heads[i - 2], window, shift, dilations,
                                                        mlp_ratio, rates[block], layer_scale_init,
                                                        backend))
                block += 1
            self.stages.append(nn.Sequential(*blocks))
            if i < 3:
                self.downsamples.append(Downsample(dim, dims[i + 1]))
        self.head = AttentionPoolHead(dims[-1], descriptor_dim)
        self.classifier = ArcFaceHead(descriptor_dim, num_classes, arcface_scale, arcface_margin)
        self.in_chans, self.image_size = in_chans, image_size

    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, descriptor_dim) L2-normalised descriptors."""
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images: expected (B, {self.in_chans}, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % TOTAL_STRIDE or w % TOTAL_STRIDE:
            raise ValueError(f"images: H and W must be multiples of {TOTAL_STRIDE}, got {h}x{w}")
        x = self.stem_norm(_nhwc(self.stem(images)))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < 3:
                x = self.downsamples[i](x)
        return self.head(x)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (descriptors, logits); logits carry the margin when labels are given."""
        descriptor = self.descriptor(images)
        return descriptor, self.classifier(descriptor, labels)

