"""Small forward+backward calls of every CUDA kernel (both layouts, strides, padding, kernel
shapes per group, shift, multi-block windows), for compute-sanitizer to watch."""

import torch

import ultron_kernels as uk

assert torch.cuda.is_available(), "compute-sanitizer workload needs a GPU"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for layout in (torch.contiguous_format, torch.channels_last):
        # (1, 9) with rate 8: the NCHW halo is too large for the shared-memory tile (direct
        # kernel); 37 x 35 images: several tiles per plane, partial at the edges.
        for stride, k in ((1, 3), (2, 5), (1, 9)):
            x = torch.randn(2, 16, 37, 35, device="cuda", dtype=dtype).to(memory_format=layout)
            w = torch.randn(16, 1, k, k, device="cuda", dtype=dtype)
            b = torch.randn(16, device="cuda", dtype=dtype)
            leaves = [t.requires_grad_() for t in (x, w, b)]
            y = uk.channelwise_dilated_conv2d(*leaves, (1, 2, 3, 8), stride, backend="cuda")
            torch.autograd.grad(y, leaves, torch.randn_like(y))
    # Tall and thin: enough rows that channels_last blocks loop over several.
    x = torch.randn(8, 16, 300, 8, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(16, 3, 3, device="cuda", dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w)]
    y = uk.channelwise_dilated_conv2d(*leaves, None, (1, 6), 1, backend="cuda")
    torch.autograd.grad(y, leaves, torch.randn_like(y))
    # Grouped: InceptionNeXt's identity, square and bands; MixNet's TF-'SAME' kernels at stride 2
    # (asymmetric padding, unequal groups, an even kernel); large kernels (31x31 and a
    # row-dilated 13x9: the register-blocked tile and the large-kernel grad weight). Both layouts.
    G = uk.DepthwiseGroup
    for groups, stride in (([G.identity(20), G(4, 3), G(4, (1, 11)), G(4, (11, 1))], 1),
                           ([G(6, 3, padding="tf_same"), G(5, 5, padding="tf_same"), G(5, 4, padding="tf_same")], 2),
                           ([G(8, 31, padding="same"), G(8, (13, 9), dilation=(2, 1), padding="same")], 1)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, sum(g.channels for g in groups), 37, 35, device="cuda", dtype=dtype)
            x = x.to(memory_format=layout).requires_grad_()
            weights = [None if g.kernel_size is None else torch.randn(
                g.channels, 1, *((g.kernel_size,) * 2 if isinstance(g.kernel_size, int) else g.kernel_size),
                device="cuda", dtype=dtype, requires_grad=True) for g in groups]
            y = uk.grouped_depthwise_conv2d(x, weights, groups, None, stride, backend="cuda")
            torch.autograd.grad(y, [x] + [w for w in weights if w is not None], torch.randn_like(y))
    # (window, shift, grid, heads, head_dim); the last: 16 heads over 200 windows, so each
    # block takes a run of several windows (the barriers between windows matter).
    for window, shift, size, heads, dim in (((7, 7), (3, 3), (15, 17), 2, 32), ((4, 6), (0, 3), (9, 7), 2, 32),
                                            ((10, 10), (5, 5), (12, 11), 2, 32), ((7, 7), (3, 3), (70, 70), 16, 16)):
        qkv = torch.randn(2, *size, 3, heads, dim, device="cuda", dtype=dtype)
        table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, device="cuda").requires_grad_()
        q, k, v = (t.requires_grad_() for t in qkv.unbind(3))
        out = uk.window_attention(q, k, v, window, shift, table, backend="cuda")
        torch.autograd.grad(out, (q, k, v, table), torch.randn_like(out))
torch.cuda.synchronize()
print("sanitizer workload done")
