"""Small forward+backward calls of every CUDA kernel (both layouts, strides, padding,
shift, multi-block windows), for compute-sanitizer to watch."""

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
    for window, shift, size in (((7, 7), (3, 3), (15, 17)), ((4, 6), (0, 3), (9, 7)), ((10, 10), (5, 5), (12, 11))):
        qkv = torch.randn(2, *size, 3, 2, 32, device="cuda", dtype=dtype)
        table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), 2, device="cuda").requires_grad_()
        q, k, v = (t.requires_grad_() for t in qkv.unbind(3))
        out = uk.window_attention(q, k, v, window, shift, table, backend="cuda")
        torch.autograd.grad(out, (q, k, v, table), torch.randn_like(out))
torch.cuda.synchronize()
print("sanitizer workload done")
