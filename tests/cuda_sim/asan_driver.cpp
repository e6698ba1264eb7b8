// The CUDA backend's real kernels, through the host simulation, under AddressSanitizer: the
// simulation's counterpart of compute-sanitizer memcheck. Calls the raw ops over shapes that
// take every host path (both layouts and all conv kernels, tensor-core and SIMT attention,
// unaligned rows, runs of windows, partial tiles); any global access outside a tensor is a
// heap-buffer-overflow report naming the kernel. Built and run by tests/test_cuda_sim.py.
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "ops.h"


namespace {

// groups: 9 ints per group (channels, kh, kw, dh, dw, pad top, bottom, left, right).
void conv(std::vector<int64_t> shape, std::vector<int64_t> groups, int64_t stride, bool channels_last,
          at::ScalarType dtype) {
  auto opts = at::TensorOptions().dtype(dtype);
  at::Tensor x = at::randn(shape, opts);
  if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  int64_t weights = 0;
  for (size_t i = 0; i < groups.size(); i += 9) weights += groups[i] * groups[i + 1] * groups[i + 2];
  const at::Tensor w = at::randn({weights}, opts);
  const at::Tensor b = at::randn({shape[1]}, opts);
  const at::Tensor y = ultron::grouped_dwconv2d_fwd(x, w, b, groups, stride);
  ultron::grouped_dwconv2d_bwd(at::randn_like(y), x, w, groups, stride);
}

// The channel-wise dilated case: one square k x k kernel, 'same' padding, a rate per group.
void dilated(std::vector<int64_t> shape, int64_t k, std::vector<int64_t> rates, int64_t stride, bool channels_last,
             at::ScalarType dtype) {
  std::vector<int64_t> groups;
  const int64_t per_group = shape[1] / static_cast<int64_t>(rates.size());
  for (int64_t d : rates) {
    const int64_t pad = d * (k - 1) / 2;
    groups.insert(groups.end(), {per_group, k, k, d, d, pad, pad, pad, pad});
  }
  conv(shape, groups, stride, channels_last, dtype);
}

// cosine: Swin V2's options (qk_norm, a per-head scale with its gradient, pad vectors with
// theirs, timm's roll-then-pad order); rel: SAM's decomposed relative position (its rows).
void attention(std::vector<int64_t> shape, int64_t head_dim, int64_t row_pad, std::vector<int64_t> window,
               std::vector<int64_t> shift, int64_t bias_kind, at::ScalarType dtype, bool cosine = false,
               bool rel = false) {
  auto opts = at::TensorOptions().dtype(dtype);
  std::vector<int64_t> full = shape;
  full.push_back(head_dim + row_pad);
  std::vector<at::Tensor> qkv;
  for (int i = 0; i < 3; ++i) qkv.push_back(at::randn(full, opts).narrow(4, 0, head_dim));
  const int64_t heads = shape[3], tokens = window[0] * window[1];
  std::optional<at::Tensor> bias;
  if (bias_kind == 1) bias = at::randn({(2 * window[0] - 1) * (2 * window[1] - 1), heads});
  if (bias_kind == 2) bias = at::randn({heads, tokens, tokens});
  const at::Tensor scale = at::rand({heads}) * 10;
  std::optional<at::Tensor> k_pad, v_pad;
  if (cosine) {
    k_pad = at::randn({heads, head_dim}, opts);
    v_pad = at::randn({heads, head_dim}, opts);
  }
  std::optional<at::Tensor> rel_rows;
  if (rel) {
    std::vector<int64_t> rows = shape;
    rows.push_back(2 * window[0] - 1 + 2 * window[1] - 1);
    rel_rows = at::randn(rows, opts);
  }
  auto [out, lse] = ultron::window_attention_fwd(qkv[0], qkv[1], qkv[2], bias, bias_kind, window, shift, scale,
                                                 0.0, cosine, k_pad, v_pad, cosine, rel_rows);
  ultron::window_attention_bwd(at::randn_like(out), qkv[0], qkv[1], qkv[2], lse, bias, bias_kind, window,
                               shift, scale, 0.0, cosine, k_pad, v_pad, cosine, bias_kind != 0, cosine, cosine,
                               rel_rows);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    dilated({2, 6, 37, 35}, 3, {1, 2, 3, 1, 2, 3}, 1, false, dtype);    // NCHW tile, partial tiles
    dilated({1, 4, 33, 34}, 5, {1, 2, 2, 1}, 2, false, dtype);          // tile, stride 2
    dilated({1, 2, 40, 21}, 7, {10, 12}, 1, false, dtype);              // direct (halo over 32 KB)
    dilated({2, 16, 9, 11}, 3, {2}, 1, true, dtype);                    // channels_last vectors
    dilated({1, 6, 9, 7}, 3, {1, 2, 3, 1, 2, 3}, 2, true, dtype);       // channels_last scalar
    dilated({1, 3, 12, 10}, 9, {2, 2, 2}, 1, false, dtype);             // K read at run time
    dilated({1, 3, 12, 10}, 9, {2, 2, 2}, 2, true, dtype);
    // InceptionNeXt: identity, square, bands (channels_last vectors: groups of 8 channels).
    const std::vector<int64_t> inception = {8, 0, 0, 1, 1, 0, 0, 0, 0, 8, 3, 3, 1, 1, 1, 1, 1, 1,
                                            8, 1, 11, 1, 1, 0, 0, 5, 5, 8, 11, 1, 1, 1, 5, 5, 0, 0};
    conv({1, 32, 13, 9}, inception, 1, true, dtype);
    conv({1, 32, 13, 9}, inception, 1, false, dtype);
    // MixNet TF-'SAME' at stride 2 (asymmetric), unequal groups, an even kernel.
    conv({1, 9, 11, 13}, {4, 3, 3, 1, 1, 0, 1, 1, 1, 3, 5, 5, 1, 1, 1, 2, 2, 2, 2, 4, 2, 1, 1, 1, 1, 0, 1}, 2,
         true, dtype);
    conv({1, 9, 11, 13}, {4, 3, 3, 1, 1, 0, 1, 1, 1, 3, 5, 5, 1, 1, 1, 2, 2, 2, 2, 4, 2, 1, 1, 1, 1, 0, 1}, 2,
         false, dtype);
    attention({2, 9, 11, 2}, 16, 0, {7, 7}, {3, 2}, 2, dtype);       // tensor cores (bf16)
    attention({1, 9, 11, 2}, 16, 4, {7, 7}, {3, 2}, 1, dtype);       // unaligned rows
    attention({1, 8, 9, 1}, 48, 0, {4, 4}, {2, 2}, 1, dtype);        // head_dim 48
    attention({1, 13, 12, 2}, 16, 0, {12, 12}, {1, 2}, 0, dtype);    // 144 tokens: SIMT
    attention({1, 5, 3, 1}, 32, 0, {7, 7}, {0, 0}, 1, dtype);        // smaller than a window
    attention({2, 9, 11, 2}, 16, 0, {4, 4}, {2, 1}, 1, dtype, true);  // Swin V2 options (fp32: SIMT)
    attention({1, 9, 10, 2}, 16, 0, {4, 4}, {0, 0}, 0, dtype, false, true);  // rel_pos, padded: SIMT
    attention({1, 3, 70, 1}, 16, 0, {3, 64}, {0, 0}, 0, dtype, false, true);  // rel_pos, streamed
  }
  setenv("ULTRON_KERNELS_CUDA_SIM_SMS", "1", 1);                     // runs of windows per block
  attention({3, 14, 21, 2}, 16, 0, {7, 7}, {3, 3}, 1, at::kBFloat16);
  attention({3, 14, 21, 2}, 16, 0, {7, 7}, {3, 3}, 1, at::kFloat);
  dilated({3, 8, 17, 19}, 3, {1}, 1, true, at::kHalf);
  std::printf("PASS\n");
  return 0;
}
