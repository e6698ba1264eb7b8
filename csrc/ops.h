// The raw operators' C++ entry points (csrc/<op>/<op>.cu), for bindings.cpp and for C++
// callers such as tests/cuda_sim/asan_driver.cpp. Each validates its own inputs.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace ultron {
// groups: 9 ints per group (channels, kh, kw, dh, dw, pad top, bottom, left, right; kernel 0x0
// is an identity group); weight: the non-identity groups' weights, each tap-major
// ((kh*kw, channels) flattened), concatenated. The backward returns grad x, the packed weight's
// gradient (float32) and the bias gradient (C,) (float32).
at::Tensor grouped_dwconv2d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef groups, int64_t stride);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_dwconv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef groups,
    int64_t stride);
std::tuple<at::Tensor, at::Tensor> window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t bias_kind, at::IntArrayRef window,
    at::IntArrayRef shift, const std::optional<at::Tensor>& scale, double scale_value, bool qk_norm,
    const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad, bool roll_first,
    const std::optional<at::Tensor>& rel_rows = std::nullopt);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    int64_t bias_kind, at::IntArrayRef window, at::IntArrayRef shift, const std::optional<at::Tensor>& scale,
    double scale_value, bool qk_norm, const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad,
    bool roll_first, bool bias_grad, bool scale_grad, bool pad_grad,
    const std::optional<at::Tensor>& rel_rows = std::nullopt);
}  // namespace ultron
