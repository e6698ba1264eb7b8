// Window attention (Swin W-MSA / SW-MSA), forward and backward: host checks and dispatch.
// The kernels are in geometry.cuh (where each token lies), simt.cuh (CUDA cores: float32 and
// larger windows), tensor_core.cuh (fp16/bf16 windows of up to 128 tokens, wmma) and
// streamed.cuh (windows whose tiles do not fit one block's shared memory, up to 64x64).
//
// Padding, the cyclic shift, the region mask and the relative-position-bias gather are index
// arithmetic; q/k/v are read through their strides (views of a packed qkv tensor).
// Backward: each block owns a run of windows for one head and accumulates the bias gradient
// of the run in shared memory; runs are summed by at::sum: deterministic, no atomics. It
// needs no saved output: delta_i = sum_j P_ij dP_ij is summed in fp32 from the window's tiles.
// Options for the models people run: a per-head scale (with its gradient), cosine attention
// (q and k rows normalised in shared memory after loading: no normalised copy in global
// memory), padded keys that take per-head vectors (with their gradients) and timm's
// roll-then-pad order. The scale and pad-vector gradients are per-block partials too.
// SAM's decomposed relative position arrives as each query's products with the table rows
// (RelPos, formed by PyTorch): the kernels gather the bias from them and the backward writes
// their gradient; it runs on the SIMT and streamed kernels (SAM's windows of 196 tokens and
// its global blocks are theirs anyway).
#include "streamed.cuh"
#include "tensor_core.cuh"

#include <cmath>
#include <type_traits>

namespace ultron {
namespace {

// Strides of a tensor in its volume form (as_volume): batch, stacked row, column, head.
Strides strides_of(const at::Tensor& t) {
  return Strides{t.stride(0), t.stride(2), t.stride(3), t.dim() > 4 ? t.stride(4) : 0};
}

// A 2D call's (B, H, W, ...) tensor as the T = 1 volume (B, 1, H, W, ...), a view; a 3D
// call's as it is, unless its frames are not stacked rows (frame stride = H x row stride,
// so that the kernels address a row of any frame with one stride: true of contiguous
// tensors and of views into a packed qkv tensor); such a tensor is copied contiguous.
at::Tensor as_volume(const at::Tensor& t, bool video) {
  if (!video) return t.unsqueeze(1);
  return t.size(1) == 1 || t.stride(1) == t.size(2) * t.stride(2) ? t : t.contiguous();
}

// q in its volume form; window and shift with one entry per axis of the call (2 or 3).
Geometry geometry_of(const at::Tensor& q, at::IntArrayRef window, at::IntArrayRef shift) {
  const size_t axes = window.size();
  TORCH_CHECK_VALUE((axes == 2 || axes == 3) && shift.size() == axes,
                    "window and shift must both have 2 entries (B, H, W, heads, D tensors) or 3 (B, T, H, W, "
                    "heads, D), got ", window, " and ", shift);
  for (size_t a = 0; a < axes; ++a) {
    TORCH_CHECK_VALUE(window[a] >= 1 && window[a] <= 1024, "window must be in [1, 1024] per axis, got ", window);
    TORCH_CHECK_VALUE(shift[a] >= 0 && shift[a] < window[a], "shift must be in [0, window) per axis, got shift ", shift,
                " for window ", window);
  }
  const int first = axes == 3 ? 0 : -1;  // a 2D window has one frame, no frame shift
  auto axis = [&](at::IntArrayRef values, int a, int none) {
    return a + first < 0 ? none : static_cast<int>(values[a + first]);
  };
  Geometry g;
  g.T = checked_int(q.size(1), "T");
  g.H = checked_int(q.size(2), "H");
  g.W = checked_int(q.size(3), "W");
  g.heads = checked_int(q.size(4), "heads");
  g.head_dim = checked_int(q.size(5), "head_dim");
  g.wt = axis(window, 0, 1);
  g.wh = axis(window, 1, 1);
  g.ww = axis(window, 2, 1);
  g.st = axis(shift, 0, 0);
  g.sh = axis(shift, 1, 0);
  g.sw = axis(shift, 2, 0);
  TORCH_CHECK_VALUE(int64_t(g.wt) * g.wh * g.ww <= 65536, "window must have at most 65536 tokens, got ", window);
  g.win_t = checked_int(ceil_div(g.T, g.wt), "windows per clip");
  g.win_h = checked_int(ceil_div(g.H, g.wh), "windows per column");
  g.win_w = checked_int(ceil_div(g.W, g.ww), "windows per row");
  g.Tp = checked_int(static_cast<int64_t>(g.win_t) * g.wt, "padded T");
  g.Hp = checked_int(static_cast<int64_t>(g.win_h) * g.wh, "padded H");
  g.Wp = checked_int(static_cast<int64_t>(g.win_w) * g.ww, "padded W");
  g.tokens = g.wt * g.wh * g.ww;
  checked_int(q.size(0) * g.win_t * g.win_h * g.win_w, "windows (B x windows per clip or image)");
  g.roll_first = g.has_pad = g.qk_norm = false;  // the options' caller sets them
  return g;
}

// q, k, v: one shape, dtype and device, 5-D with a 2D window or 6-D with a 3D one, the last
// dimension contiguous.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef window) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* tensors[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *tensors[i];
    check_device(t, names[i]);
    TORCH_CHECK_VALUE(t.dim() == 5 || t.dim() == 6, names[i],
                      " must be 5-D (B, H, W, heads, head_dim) or 6-D (B, T, H, W, heads, head_dim), got ", t.dim(),
                      "-D");
    TORCH_CHECK_VALUE(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(),
                "q, k, v must have one shape, dtype and device; ", names[i], " is ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device(), ", q is ", q.sizes(), " ", q.scalar_type(), " on ", q.device());
    TORCH_CHECK_VALUE(t.stride(-1) == 1, names[i], ": the last dimension must be contiguous, stride ", t.stride(-1));
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(window.size()) == q.dim() - 3, "window ", window, " has ", window.size(),
                    " entries; ", q.dim(), "-D q needs ", q.dim() - 3);
}

// The bias as the kernels read it: float, contiguous, of the shape its kind says.
at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t kind, const at::Tensor& q,
                      const Geometry& g) {
  TORCH_CHECK_VALUE(kind == 0 || kind == kBiasTable || kind == kBiasDense,
              "bias_kind must be 0 (none), 1 (table) or 2 (dense), got ", kind);
  if (kind == 0) return at::Tensor();
  TORCH_CHECK_VALUE(bias.has_value(), "bias_kind ", kind, " needs a bias tensor");
  check_device(*bias, "rel_pos_bias");
  TORCH_CHECK_VALUE(bias->device() == q.device(), "rel_pos_bias is on ", bias->device(), ", q on ", q.device());
  const std::vector<int64_t> expected = kind == kBiasTable
      ? std::vector<int64_t>{int64_t(2 * g.wt - 1) * (2 * g.wh - 1) * (2 * g.ww - 1), g.heads}
      : std::vector<int64_t>{g.heads, g.tokens, g.tokens};
  TORCH_CHECK_VALUE(bias->sizes() == at::IntArrayRef(expected), "rel_pos_bias of kind ",
              kind == kBiasTable ? "table" : "dense", " must have sizes ", at::IntArrayRef(expected), ", got ",
              bias->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "rel_pos_bias must be floating point, got ",
              bias->scalar_type());
  return bias->to(at::kFloat).contiguous();
}

// The decomposed relative position's per-query rows (RelPos), in volume form: q's shape with
// (2wh - 1) + (2ww - 1) columns for head_dim, q's dtype and device, 2D windows; contiguous
// (the matmul that forms them makes them so: no copy). Undefined without them.
at::Tensor checked_rel_rows(const std::optional<at::Tensor>& rel_rows, const at::Tensor& q_in, const Geometry& g) {
  if (!rel_rows.has_value()) return at::Tensor();
  const at::Tensor& r = *rel_rows;
  check_device(r, "rel_rows");
  TORCH_CHECK_VALUE(q_in.dim() == 5, "rel_rows (the decomposed relative position, rel_pos) is defined for 2D "
                    "windows; q is ", q_in.dim(), "-D");
  std::vector<int64_t> expected(q_in.sizes().begin(), q_in.sizes().end());
  expected.back() = int64_t(2 * g.wh - 1) + (2 * g.ww - 1);
  TORCH_CHECK_VALUE(r.sizes() == at::IntArrayRef(expected), "rel_rows (rel_pos's per-query rows) must have sizes ",
                    at::IntArrayRef(expected), " (q's, with (2wh - 1) + (2ww - 1) columns for head_dim), got ",
                    r.sizes());
  TORCH_CHECK_TYPE(r.scalar_type() == q_in.scalar_type(), "rel_rows must have q's dtype ", q_in.scalar_type(),
                   ", got ", r.scalar_type());
  TORCH_CHECK_VALUE(r.device() == q_in.device(), "rel_rows is on ", r.device(), ", q on ", q_in.device());
  return r.contiguous().unsqueeze(1);
}

// The kernels' view of the rows (and of their float32 gradient, which has their layout).
template <typename T>
RelPos<T> rel_view(const at::Tensor& rows, const at::Tensor& grad = at::Tensor()) {
  if (!rows.defined()) return RelPos<T>{nullptr, Strides{0, 0, 0, 0}, nullptr};
  return RelPos<T>{rows.data_ptr<T>(), strides_of(rows), grad.defined() ? grad.data_ptr<float>() : nullptr};
}

size_t fwd_smem_bytes(const Geometry& g) {
  return sizeof(float) * (2 * g.tokens * (g.head_dim + 1) + (kFwdThreads / 32) * (g.tokens + g.head_dim));
}

// extras: cosine attention or a scale gradient (dS * C and six RowExtras rows); rel: the
// decomposed relative position (each token's row staged).
size_t bwd_smem_bytes(const Geometry& g, bool bias_grad, bool extras, bool rel) {
  const size_t n = g.tokens, rel_columns = rel ? (2 * g.wh - 1) + (2 * g.ww - 1) : 0;
  return sizeof(float) * (4 * n * (g.head_dim + 1) + (extras ? 3 : 2) * n * (n + 1) + 2 * n +
                          (extras ? 6 * n : 0) + (bias_grad ? n * n : 0) + n * rel_columns + 2 * n);
}

// The options as the kernels read them. scale: (heads,) floating -> float, contiguous; without
// one, scale_value for every head (no tensor is made: no fill kernel per call).
// k_pad, v_pad: both or neither, (heads, head_dim) in q's dtype, contiguous.
struct CheckedOptions {
  at::Tensor scale, k_pad, v_pad;
  float scale_value;
  template <typename T>
  Options<T> view() const {
    return Options<T>{scale.defined() ? scale.data_ptr<float>() : nullptr, scale_value,
                      k_pad.defined() ? k_pad.data_ptr<T>() : nullptr, v_pad.defined() ? v_pad.data_ptr<T>() : nullptr};
  }
};

CheckedOptions check_options(const std::optional<at::Tensor>& scale, double scale_value,
                             const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad,
                             const at::Tensor& q, const Geometry& g) {
  CheckedOptions opt{at::Tensor(), at::Tensor(), at::Tensor(), 0.f};
  if (scale.has_value()) {
    check_device(*scale, "scale");
    TORCH_CHECK_VALUE(scale->device() == q.device(), "scale is on ", scale->device(), ", q on ", q.device());
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == g.heads, "scale must have shape (heads,) = (", g.heads,
                      "), got ", scale->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(scale->scalar_type()), "scale must be floating point, got ",
                     scale->scalar_type());
    opt.scale = scale->to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK_VALUE(std::isfinite(scale_value), "scale_value must be finite, got ", scale_value);
    opt.scale_value = static_cast<float>(scale_value);
  }
  TORCH_CHECK_VALUE(k_pad.has_value() == v_pad.has_value(), "k_pad and v_pad must be given together");
  if (!k_pad.has_value()) return opt;
  const char* names[2] = {"k_pad", "v_pad"};
  const at::Tensor* pads[2] = {&*k_pad, &*v_pad};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *pads[i];
    check_device(t, names[i]);
    TORCH_CHECK_VALUE(t.device() == q.device(), names[i], " is on ", t.device(), ", q on ", q.device());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == g.heads && t.size(1) == g.head_dim, names[i],
                      " must have shape (heads, head_dim) = (", g.heads, ", ", g.head_dim, "), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), names[i], " must have q's dtype ", q.scalar_type(),
                     ", got ", t.scalar_type());
  }
  opt.k_pad = k_pad->contiguous();
  opt.v_pad = v_pad->contiguous();
  return opt;
}

// Calls f(std::true_type) for 3D windows, f(std::false_type) for 2D: the kernels' kVideo.
template <typename F>
void dispatch_frames(bool video, F&& f) {
  if (video) f(std::true_type{});
  else f(std::false_type{});
}

// fp16/bf16 windows of up to kTcMaxTokens tokens, head_dim a multiple of 16, whose tiles fit
// in shared memory, run on the tensor cores when the kernel was compiled for sm_80 or newer;
// everything else on the SIMT kernels.
template <auto TcKernel>
bool tensor_core_path(const at::Tensor& q, const Geometry& g, size_t smem_bytes) {
  return (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) && g.tokens <= kTcMaxTokens &&
         g.head_dim % 16 == 0 && static_cast<int64_t>(smem_bytes) <= current_device().smem_optin &&
         kernel_ptx_version<TcKernel>() >= 80;
}

// Every row (all indices but the last) of these 16-bit tensors starts on a 16-byte boundary.
bool rows_are_16_byte_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < t->dim() - 1; ++d)
      if (t->stride(d) % 8 != 0) return false;
  }
  return true;
}

// The pad vectors (when given) start on 16 bytes: each head's row then does too (head_dim
// is a multiple of 16 on the tensor-core path).
bool pads_are_16_byte_aligned(const CheckedOptions& opt) {
  return !opt.k_pad.defined() || (reinterpret_cast<uintptr_t>(opt.k_pad.data_ptr()) % 16 == 0 &&
                                  reinterpret_cast<uintptr_t>(opt.v_pad.data_ptr()) % 16 == 0);
}

// Windows per block so that windows x heads blocks come to about blocks_per_sm per SM;
// depends only on the shape and the device, so the bias-gradient partials repeat bitwise.
int windows_per_block(int64_t windows, int heads, int blocks_per_sm) {
  const int64_t runs = std::max<int64_t>(
      1, std::min<int64_t>(windows, ceil_div(int64_t(blocks_per_sm) * current_device().sms, heads)));
  return checked_int(std::max<int64_t>(1, ceil_div(windows, runs)), "windows per block");
}

// A window whose one-block tiles need more shared memory than the device has (one_block
// bytes) streams its tiles instead (streamed.cuh): these kernels must then fit.
void check_streamed(const Geometry& g, std::initializer_list<int> kernels, size_t one_block, const char* op) {
  const int64_t limit = current_device().smem_optin;
  TORCH_CHECK_VALUE(g.head_dim <= kStreamMaxDim, op, ": a window of ", g.tokens, " tokens needs ", one_block,
                    " bytes of shared memory per block in one tile, over this device's ", limit,
                    "; the streamed kernels take head_dim <= ", kStreamMaxDim, ", got ", g.head_dim);
  for (int kernel : kernels) {
    const size_t need = streamed_smem_bytes(g.head_dim, kernel);
    TORCH_CHECK_VALUE(static_cast<int64_t>(need) <= limit, op, ": a window of ", g.tokens, " tokens with head_dim ",
                      g.head_dim, " needs ", one_block, " bytes of shared memory per block in one tile and ", need,
                      " streamed; this device allows ", limit);
  }
}

// The streamed backward's bias-gradient partials are (runs, heads, N, N) float32: runs are
// capped so that they stay within this many bytes (one run at least: the size of a dense
// bias's own gradient), as in the Triton backward.
constexpr int64_t kBiasPartialsBytes = int64_t(256) << 20;

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias, int64_t bias_kind, at::IntArrayRef window,
    at::IntArrayRef shift, const std::optional<at::Tensor>& scale, double scale_value, bool qk_norm,
    const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad, bool roll_first,
    const std::optional<at::Tensor>& rel_rows) {
  check_qkv(q_in, k_in, v_in, window);
  const DeviceGuard guard(q_in.device());
  const bool video = q_in.dim() == 6;
  const at::Tensor q = as_volume(q_in, video), k = as_volume(k_in, video), v = as_volume(v_in, video);
  Geometry g = geometry_of(q, window, shift);
  const CheckedOptions opt = check_options(scale, scale_value, k_pad, v_pad, q, g);
  g.qk_norm = qk_norm;
  g.roll_first = roll_first;
  g.has_pad = opt.k_pad.defined();
  const at::Tensor b = float_bias(bias, bias_kind, q, g);
  const at::Tensor rel = checked_rel_rows(rel_rows, q_in, g);
  at::Tensor out_in = at::empty(q_in.sizes(), q.options());
  at::Tensor lse_in = at::empty(q_in.sizes().slice(0, q_in.dim() - 1), q.options().dtype(at::kFloat));
  const at::Tensor out = as_volume(out_in, video), lse = as_volume(lse_in, video);
  const int64_t windows = q.size(0) * g.win_t * g.win_h * g.win_w;
  if (out.numel() == 0) return {out_in, lse_in};
  TORCH_CHECK_VALUE(windows < (1LL << 31), "window_attention_fwd: too many windows for one launch (", windows, ")");
  TORCH_CHECK_VALUE(g.heads <= 65535, "window_attention_fwd: at most 65535 heads, got ", g.heads);
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  const int kind = static_cast<int>(b.defined() ? bias_kind : 0);
  const size_t tc_smem = tc_layout(g.tokens, g.head_dim, false, bias_ptr != nullptr, false, qk_norm).bytes;
  const bool half = q.scalar_type() == at::kHalf;
  const bool tensor_cores =
      !rel.defined() && (half ? tensor_core_path<window_attn_fwd_tc_kernel<at::Half, false>>(q, g, tc_smem)
                              : tensor_core_path<window_attn_fwd_tc_kernel<at::BFloat16, false>>(q, g, tc_smem));
  if (tensor_cores) {
    // Runs of windows per block, about two waves of blocks: the staged bias is reused
    // across the run.
    const int per_block = windows_per_block(windows, g.heads, 8);
    const dim3 grid(static_cast<unsigned>(ceil_div(windows, per_block)), g.heads);
    const bool vec = rows_are_16_byte_aligned({&q, &k, &v, &out}) && pads_are_16_byte_aligned(opt);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      dispatch_frames(video, [&](auto frames) {
        launch<window_attn_fwd_tc_kernel<T, decltype(frames)::value>>(grid, kTcThreads, tc_smem, q.data_ptr<T>(), k.data_ptr<T>(),
                                             v.data_ptr<T>(), bias_ptr, kind, out.data_ptr<T>(),
                                             lse.data_ptr<float>(), g, strides_of(q), strides_of(k), strides_of(v),
                                             strides_of(out), opt.view<T>(), windows, per_block, vec);
      });
    };
    if (half) run(at::Half{});
    else run(at::BFloat16{});
    return {out_in, lse_in};
  }
  const size_t smem = fwd_smem_bytes(g);
  if (static_cast<int64_t>(smem) > current_device().smem_optin) {
    check_streamed(g, {kStreamFwd}, smem, "window_attention_fwd");
    const int q_tiles = static_cast<int>(ceil_div(g.tokens, kStreamTile));
    const dim3 grid(checked_int(windows * q_tiles, "windows x query tiles"), g.heads);
    dispatch_float_types(q.scalar_type(), "window_attention_fwd", [&](auto tag) {
      using T = decltype(tag);
      dispatch_frames(video, [&](auto frames) {
        launch<window_attn_fwd_streamed_kernel<T, decltype(frames)::value>>(
            grid, kStreamThreads, streamed_smem_bytes(g.head_dim, kStreamFwd), q.data_ptr<T>(), k.data_ptr<T>(),
            v.data_ptr<T>(), bias_ptr, kind, out.data_ptr<T>(), lse.data_ptr<float>(), g, strides_of(q),
            strides_of(k), strides_of(v), strides_of(out), strides_of(lse), opt.view<T>(), rel_view<T>(rel),
            q_tiles);
      });
    });
    return {out_in, lse_in};
  }
  const dim3 grid(static_cast<unsigned>(windows), g.heads);
  dispatch_float_types(q.scalar_type(), "window_attention_fwd", [&](auto tag) {
    using T = decltype(tag);
    dispatch_frames(video, [&](auto frames) {
      launch<window_attn_fwd_kernel<T, decltype(frames)::value>>(grid, kFwdThreads, smem, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                                        bias_ptr, kind, out.data_ptr<T>(), lse.data_ptr<float>(), g, strides_of(q),
                                        strides_of(k), strides_of(v), strides_of(out), strides_of(lse),
                                        opt.view<T>(), rel_view<T>(rel));
    });
  });
  return {out_in, lse_in};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& bias,
    int64_t bias_kind, at::IntArrayRef window, at::IntArrayRef shift, const std::optional<at::Tensor>& scale,
    double scale_value, bool qk_norm, const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad,
    bool roll_first, bool bias_grad, bool scale_grad, bool pad_grad, const std::optional<at::Tensor>& rel_rows) {
  check_qkv(q_in, k_in, v_in, window);
  check_device(grad_out_in, "grad_out");
  check_device(lse_in, "lse");
  TORCH_CHECK_VALUE(grad_out_in.sizes() == q_in.sizes() && grad_out_in.stride(-1) == 1 &&
              grad_out_in.scalar_type() == q_in.scalar_type() && grad_out_in.device() == q_in.device(),
              "grad_out must match q's shape, dtype and device with a contiguous last dimension");
  TORCH_CHECK_VALUE(lse_in.sizes() == q_in.sizes().slice(0, q_in.dim() - 1) && lse_in.is_contiguous() &&
              lse_in.scalar_type() == at::kFloat,
              "lse must be the contiguous float32 logsumexp window_attention_fwd returned for this q");
  const DeviceGuard guard(q_in.device());
  const bool video = q_in.dim() == 6;
  const at::Tensor q = as_volume(q_in, video), k = as_volume(k_in, video), v = as_volume(v_in, video);
  const at::Tensor grad_out = as_volume(grad_out_in, video);
  const at::Tensor lse = as_volume(lse_in, video);
  Geometry g = geometry_of(q, window, shift);
  const CheckedOptions opt = check_options(scale, scale_value, k_pad, v_pad, q, g);
  g.qk_norm = qk_norm;
  g.roll_first = roll_first;
  g.has_pad = opt.k_pad.defined();
  const at::Tensor b = float_bias(bias, bias_kind, q, g);
  const at::Tensor rel = checked_rel_rows(rel_rows, q_in, g);
  TORCH_CHECK_VALUE(!bias_grad || b.defined(), "bias_grad needs a bias");
  TORCH_CHECK_VALUE(!pad_grad || g.has_pad, "pad_grad needs k_pad and v_pad");
  TORCH_CHECK_VALUE(!scale_grad || scale.has_value(), "scale_grad needs a scale tensor");
  at::Tensor dq_in = at::empty(q_in.sizes(), q.options());
  at::Tensor dk_in = at::empty(q_in.sizes(), q.options());
  at::Tensor dv_in = at::empty(q_in.sizes(), q.options());
  const at::Tensor dq = as_volume(dq_in, video), dk = as_volume(dk_in, video), dv = as_volume(dv_in, video);
  const int64_t windows = q.size(0) * g.win_t * g.win_h * g.win_w;
  TORCH_CHECK_VALUE(g.heads <= 65535, "window_attention_bwd: at most 65535 heads, got ", g.heads);
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  const int kind = static_cast<int>(b.defined() ? bias_kind : 0);
  const bool extras = qk_norm || scale_grad;
  const size_t tc_smem = tc_layout(g.tokens, g.head_dim, true, bias_ptr != nullptr, bias_grad, extras).bytes;
  const bool half = q.scalar_type() == at::kHalf;
  const bool tensor_cores =
      !rel.defined() && (half ? tensor_core_path<window_attn_bwd_tc_kernel<at::Half, false>>(q, g, tc_smem)
                              : tensor_core_path<window_attn_bwd_tc_kernel<at::BFloat16, false>>(q, g, tc_smem));
  const size_t smem = bwd_smem_bytes(g, bias_grad, extras, rel.defined());
  const bool streamed = !tensor_cores && static_cast<int64_t>(smem) > current_device().smem_optin;
  if (streamed) check_streamed(g, {kStreamDq, kStreamDkdv}, smem, "window_attention_bwd");
  // Tiles per window on the streamed path (one otherwise): its blocks and scale partials
  // are per query tile, its pad partials per key tile.
  const int tiles = streamed ? static_cast<int>(ceil_div(g.tokens, kStreamTile)) : 1;
  // Runs of windows per block: enough blocks to fill the GPU a few times, fewer bias partials.
  int per_block = windows > 0 ? windows_per_block(windows, g.heads * tiles, 8) : 1;
  if (windows > 0 && streamed && bias_grad) {
    const int64_t most_runs = std::max<int64_t>(1, kBiasPartialsBytes / (4 * int64_t(g.heads) * g.tokens * g.tokens));
    per_block = std::max(per_block, checked_int(ceil_div(windows, most_runs), "windows per block"));
  }
  const int64_t runs = windows > 0 ? ceil_div(windows, per_block) : 0;
  const at::TensorOptions partial = q.options().dtype(at::kFloat);
  const int64_t blocks = std::max<int64_t>(runs, 1);
  const int64_t pad_partials = streamed ? std::max<int64_t>(windows * tiles, 1) : blocks;
  at::Tensor dbias = bias_grad ? at::zeros({blocks, g.heads, g.tokens, g.tokens}, partial) : at::empty({0}, partial);
  at::Tensor dscale = scale_grad ? at::zeros({std::max<int64_t>(windows * tiles, 1), g.heads}, partial)
                                 : at::empty({0}, partial);
  at::Tensor dpad = pad_grad ? at::zeros({pad_partials, g.heads, 2, g.head_dim}, partial) : at::empty({0}, partial);
  // The rows' gradient: the streamed dq kernel adds to it tile by tile.
  const at::Tensor drel = rel.defined() ? at::zeros(rel.sizes(), partial) : at::Tensor();
  // The per-block partials summed in a fixed order: deterministic.
  auto result = [&] {
    return std::make_tuple(dq_in, dk_in, dv_in, bias_grad ? dbias.sum(0) : dbias, scale_grad ? dscale.sum(0) : dscale,
                           pad_grad ? dpad.select(2, 0).sum(0) : at::empty({0}, partial),
                           pad_grad ? dpad.select(2, 1).sum(0) : at::empty({0}, partial),
                           rel.defined() ? drel.squeeze(1).to(q.scalar_type()) : at::empty({0}, q.options()));
  };
  if (runs == 0 || q.numel() == 0) {
    dq_in.zero_();
    dk_in.zero_();
    dv_in.zero_();
    return result();
  }
  const dim3 grid(checked_int(runs, "window runs"), g.heads);
  float* dbias_ptr = bias_grad ? dbias.data_ptr<float>() : nullptr;
  const ExtraGrads extra{scale_grad ? dscale.data_ptr<float>() : nullptr, pad_grad ? dpad.data_ptr<float>() : nullptr};
  if (streamed) {  // the dq kernel (which stores delta), then the dk/dv kernel
    at::Tensor delta_in = at::empty(lse_in.sizes(), partial);
    const at::Tensor delta = as_volume(delta_in, video);
    const dim3 dq_grid(checked_int(runs * tiles, "window runs x query tiles"), g.heads);
    const dim3 dkdv_grid(checked_int(windows * tiles, "windows x key tiles"), g.heads);
    dispatch_float_types(q.scalar_type(), "window_attention_bwd", [&](auto tag) {
      using T = decltype(tag);
      dispatch_frames(video, [&](auto frames) {
        constexpr bool kVideo = decltype(frames)::value;
        launch<window_attn_bwd_dq_streamed_kernel<T, kVideo>>(
            dq_grid, kStreamThreads, streamed_smem_bytes(g.head_dim, kStreamDq), q.data_ptr<T>(), k.data_ptr<T>(),
            v.data_ptr<T>(), lse.data_ptr<float>(), grad_out.data_ptr<T>(), bias_ptr, kind, dq.data_ptr<T>(),
            delta.data_ptr<float>(), dbias_ptr, g, strides_of(q), strides_of(k), strides_of(v), strides_of(lse),
            strides_of(grad_out), strides_of(dq), opt.view<T>(), extra.dscale, rel_view<T>(rel, drel), windows,
            per_block, tiles);
        launch<window_attn_bwd_dkdv_streamed_kernel<T, kVideo>>(
            dkdv_grid, kStreamDkdvThreads, streamed_smem_bytes(g.head_dim, kStreamDkdv), q.data_ptr<T>(),
            k.data_ptr<T>(), v.data_ptr<T>(), lse.data_ptr<float>(), delta.data_ptr<float>(), grad_out.data_ptr<T>(),
            bias_ptr, kind, dk.data_ptr<T>(), dv.data_ptr<T>(), g, strides_of(q), strides_of(k), strides_of(v),
            strides_of(lse), strides_of(grad_out), strides_of(dq), opt.view<T>(), extra.dpad, rel_view<T>(rel),
            tiles);
      });
    });
    return result();
  }
  if (tensor_cores) {
    const bool vec = rows_are_16_byte_aligned({&q, &k, &v, &grad_out, &dq}) && pads_are_16_byte_aligned(opt);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      dispatch_frames(video, [&](auto frames) {
        launch<window_attn_bwd_tc_kernel<T, decltype(frames)::value>>(
            grid, kTcBwdThreads, tc_smem, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
            lse.data_ptr<float>(), grad_out.data_ptr<T>(), bias_ptr, kind, dq.data_ptr<T>(), dk.data_ptr<T>(),
            dv.data_ptr<T>(), dbias_ptr, g, strides_of(q), strides_of(k), strides_of(v),
            strides_of(grad_out), strides_of(dq), opt.view<T>(), extra, windows, per_block, vec);
      });
    };
    if (half) run(at::Half{});
    else run(at::BFloat16{});
    return result();
  }
  dispatch_float_types(q.scalar_type(), "window_attention_bwd", [&](auto tag) {
    using T = decltype(tag);
    dispatch_frames(video, [&](auto frames) {
      launch<window_attn_bwd_kernel<T, decltype(frames)::value>>(grid, kBwdThreads, smem, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                                        lse.data_ptr<float>(), grad_out.data_ptr<T>(), bias_ptr,
                                        kind, dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), dbias_ptr, g,
                                        strides_of(q), strides_of(k), strides_of(v), strides_of(lse), strides_of(grad_out), strides_of(dq), opt.view<T>(), extra,
                                        rel_view<T>(rel, drel), windows, per_block);
    });
  });
  return result();
}

}  // namespace ultron
