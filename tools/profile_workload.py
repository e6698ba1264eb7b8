"""One forward and one backward of each op and fused backend at the first benchmark shape
(bf16), for Nsight Compute: `tools/gpu_check.sh profile` runs it under ncu and keeps, per
kernel, its time, DRAM bytes and throughput, and its load/store-unit wavefronts (the counts
in bench/NOTES.md predict these). Triton autotuning is off so each kernel runs once."""

import os

os.environ.setdefault("ULTRON_KERNELS_AUTOTUNE", "0")

import torch  # noqa: E402

import ultron_kernels as uk  # noqa: E402

assert torch.cuda.is_available(), "the profile workload needs a GPU"
torch.manual_seed(0)
backends = [b for b, why in uk.available_backends("cuda").items() if why == "available" and b != "reference"]
for backend in backends:
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(32, 96, 56, 56, device="cuda", dtype=torch.bfloat16).to(memory_format=layout)
        w = torch.randn(96, 3, 3, device="cuda", dtype=torch.bfloat16)
        leaves = [t.requires_grad_() for t in (x, w)]
        y = uk.channelwise_dilated_conv2d(*leaves, None, (1, 3, 6), backend=backend)
        torch.autograd.grad(y, leaves, torch.randn_like(y))
    qkv = torch.randn(32, 56, 56, 3, 4, 32, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(13 * 13, 4, device="cuda").requires_grad_()
    q, k, v = (t.requires_grad_() for t in qkv.unbind(3))
    out = uk.window_attention(q, k, v, 7, 3, table, backend=backend)
    torch.autograd.grad(out, (q, k, v, table), torch.randn_like(out))
torch.cuda.synchronize()
print("profile workload done:", ", ".join(backends))
