// Window attention: where each token of a window lies. Windows of a (B, T, H, W) volume (a
// 2D grid is T = 1 with windows of one frame), the padding to whole windows, the cyclic shift
// (both orders), the shifted-window regions, the keys padding may add, and the relative
// position bias of a token pair.
#pragma once

#include "../common.cuh"

namespace ultron {
namespace {

constexpr int kBiasTable = 1;
constexpr int kBiasDense = 2;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps (Swin V2's cosine attention)

struct Geometry {
  int T, H, W, Tp, Hp, Wp, win_t, win_h, win_w, wt, wh, ww, st, sh, sw, tokens, head_dim, heads;
  bool roll_first;  // timm: the image is rolled, then padded (else padded, then rolled)
  bool has_pad;     // padding tokens are keys with the head's pad vectors (else excluded)
  bool qk_norm;     // cosine attention
};

// Element strides of a (B, T, H, W, heads, ...) tensor (n: heads).
struct Strides {
  int64_t b, t, h, w, n;
};

// A token's frame, row and column inside its window (t = (f * wh + r) * ww + c).
struct WindowPos {
  int f, r, c;
};

__device__ __forceinline__ WindowPos window_pos(const Geometry& g, int t) {
  return WindowPos{t / (g.wh * g.ww), (t / g.ww) % g.wh, t % g.ww};
}

struct Token {
  int64_t batch;
  int z, y, x, region;
  WindowPos pos;
  bool real;    // an image position: a query, and a key
  bool inside;  // inside the window (t < tokens): padding when not real
};

// Swin's region of a rolled coordinate along one axis: slices (0, -w), (-w, -s), (-s, end).
__device__ __forceinline__ int axis_region(int rolled, int padded, int window, int shift) {
  return shift > 0 ? (rolled >= padded - window) + (rolled >= padded - shift) : 0;
}

__device__ __forceinline__ Token token_of(const Geometry& g, int64_t window, int t) {
  Token tok;
  const int64_t per_frame = static_cast<int64_t>(g.win_h) * g.win_w;
  const int64_t per_image = g.win_t * per_frame;
  tok.batch = window / per_image;
  const int64_t local = window % per_image;
  tok.pos = window_pos(g, t);
  const int z_rolled = static_cast<int>(local / per_frame) * g.wt + tok.pos.f;
  const int y_rolled = static_cast<int>((local % per_frame) / g.win_w) * g.wh + tok.pos.r;
  const int x_rolled = static_cast<int>(local % g.win_w) * g.ww + tok.pos.c;
  tok.inside = t < g.tokens;
  if (g.roll_first) {  // undo torch.roll(-shift) of the image, padded after the roll
    tok.z = (z_rolled + g.st) % g.T;
    tok.y = (y_rolled + g.sh) % g.H;
    tok.x = (x_rolled + g.sw) % g.W;
    tok.real = tok.inside && z_rolled < g.T && y_rolled < g.H && x_rolled < g.W;
  } else {             // undo torch.roll(-shift) of the padded grid
    tok.z = (z_rolled + g.st) % g.Tp;
    tok.y = (y_rolled + g.sh) % g.Hp;
    tok.x = (x_rolled + g.sw) % g.Wp;
    tok.real = tok.inside && tok.z < g.T && tok.y < g.H && tok.x < g.W;
  }
  tok.region = (axis_region(z_rolled, g.Tp, g.wt, g.st) * 3 + axis_region(y_rolled, g.Hp, g.wh, g.sh)) * 3 +
               axis_region(x_rolled, g.Wp, g.ww, g.sw);
  return tok;
}

__device__ __forceinline__ int64_t offset(const Strides& s, const Token& t, int head) {
  return t.batch * s.b + t.z * s.t + t.y * s.h + t.x * s.w + head * s.n;
}

// Whether the token is a key: an image position, or padding with pad vectors.
__device__ __forceinline__ bool is_key(const Geometry& g, const Token& t) {
  return g.has_pad ? t.inside : t.real;
}

// Bias of the in-window token pair (i, j), both < tokens, at window positions pi and pj.
// bias is float: a relative position table (((2wt-1) (2wh-1) (2ww-1), heads), frame offset
// slowest: torchvision's 3D order, Swin's 2D one when wt = 1) or a (heads, N, N) dense
// tensor, both contiguous. It does not depend on the window.
__device__ __forceinline__ float bias_at(const float* bias, int kind, const Geometry& g, int head, int i, int j,
                                         const WindowPos& pi, const WindowPos& pj) {
  if (kind == kBiasTable) {
    const int entry = ((pi.f - pj.f + g.wt - 1) * (2 * g.wh - 1) + (pi.r - pj.r + g.wh - 1)) * (2 * g.ww - 1) +
                      (pi.c - pj.c + g.ww - 1);
    return bias[entry * g.heads + head];
  }
  if (kind == kBiasDense) return bias[(static_cast<int64_t>(head) * g.tokens + i) * g.tokens + j];
  return 0.f;
}

}  // namespace
}  // namespace ultron
