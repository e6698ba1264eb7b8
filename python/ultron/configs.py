"""ULTRON configurations: one table (also in the README).

Our reading of the paper (ACCV 2024, "Unifying Local Transformer and Convolution for
Large-scale Image Retrieval"): four stages, the first two convolutional (channel-wise dilated
depthwise conv blocks), the last two local-window transformers whose keys get spatial
context (depthwise 3x3 conv) and whose values get a channel-wise dilated conv.
"""

from __future__ import annotations

CONFIGS = {
    #             dims per stage        depths        heads (stages 3, 4)  window  dilations   image  descriptor
    "ultron_tiny": dict(dims=(24, 48, 96, 192), depths=(1, 1, 1, 1), heads=(6, 12), window=4,
                        dilations=(1, 2, 3), image_size=64, descriptor_dim=64),
    "ultron_s": dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(12, 24), window=7,
                     dilations=(1, 3, 6), image_size=224, descriptor_dim=512),
    "ultron_b": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(16, 32), window=7,
                     dilations=(1, 2, 3, 4), image_size=224, descriptor_dim=512),
}

DEFAULTS = dict(in_chans=3, num_classes=1000, mlp_ratio=4.0, drop_path=0.0, layer_scale_init=1e-6,
                arcface_scale=30.0, arcface_margin=0.3)

TOTAL_STRIDE = 32  # stem 4 x three 2x downsamplings
