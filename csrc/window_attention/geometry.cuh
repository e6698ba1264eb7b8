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

// Element strides of a (B, T, H, W, heads, ...) tensor whose frames are stacked rows (frame
// stride = H x row stride, which the host ensures): batch, row of the T*H stacked rows,
// column, head.
struct Strides {
  int64_t b, h, w, n;
};

// The in-window token t = (f * wh + r) * ww + c as a coordinate of the relative position
// table: (f * (2wh-1) + r) * (2ww-1) + c. The table entry of a pair (i, j) is then
// table_pos(i) - table_pos(j) + table_pos of the offset (wt-1, wh-1, ww-1): one int per token
// instead of three. kVideo: the window may span frames (3D); without it (2D, wt = 1) the
// frame arithmetic is compiled out.
template <bool kVideo>
__device__ __forceinline__ int table_pos(const Geometry& g, int t) {
  const int frame = kVideo ? t / (g.wh * g.ww) : 0;
  return (frame * (2 * g.wh - 1) + (t / g.ww) % g.wh) * (2 * g.ww - 1) + t % g.ww;
}

struct Token {
  int64_t batch;
  int y, x, region;  // y: the row among the T*H stacked rows of the batch's frames
  int table;    // table_pos of its in-window index
  bool real;    // an image position: a query, and a key
  bool inside;  // inside the window (t < tokens): padding when not real
};

// Swin's region of a rolled coordinate along one axis: slices (0, -w), (-w, -s), (-s, end).
__device__ __forceinline__ int axis_region(int rolled, int padded, int window, int shift) {
  return shift > 0 ? (rolled >= padded - window) + (rolled >= padded - shift) : 0;
}

// Token t of window `window` (numbered batch, frame, row, column). kVideo: windows may
// span frames; without it (a 2D grid: T = 1) the frame arithmetic is compiled out.
template <bool kVideo>
__device__ __forceinline__ Token token_of(const Geometry& g, int64_t window, int t) {
  Token tok;
  // All windows of a launch are numbered in int (host check): no 64-bit division, which
  // ptxas makes a call that spills registers around it.
  const int per_frame = g.win_h * g.win_w;
  const int per_image = kVideo ? g.win_t * per_frame : per_frame;
  const int index = static_cast<int>(window);
  tok.batch = index / per_image;
  const int local = index % per_image;
  const int in_frame = kVideo ? local % per_frame : local;
  tok.table = table_pos<kVideo>(g, t);
  const int z_rolled = kVideo ? (local / per_frame) * g.wt + t / (g.wh * g.ww) : 0;
  const int y_rolled = (in_frame / g.win_w) * g.wh + (t / g.ww) % g.wh;
  const int x_rolled = (in_frame % g.win_w) * g.ww + t % g.ww;
  tok.inside = t < g.tokens;
  int z = 0, y;
  if (g.roll_first) {  // undo torch.roll(-shift) of the image, padded after the roll
    if (kVideo) z = (z_rolled + g.st) % g.T;
    y = (y_rolled + g.sh) % g.H;
    tok.x = (x_rolled + g.sw) % g.W;
    tok.real = tok.inside && (!kVideo || z_rolled < g.T) && y_rolled < g.H && x_rolled < g.W;
  } else {             // undo torch.roll(-shift) of the padded grid
    if (kVideo) z = (z_rolled + g.st) % g.Tp;
    y = (y_rolled + g.sh) % g.Hp;
    tok.x = (x_rolled + g.sw) % g.Wp;
    tok.real = tok.inside && (!kVideo || z < g.T) && y < g.H && tok.x < g.W;
  }
  tok.y = kVideo ? z * g.H + y : y;
  const int frame_region = kVideo ? axis_region(z_rolled, g.Tp, g.wt, g.st) : 0;
  tok.region = (frame_region * 3 + axis_region(y_rolled, g.Hp, g.wh, g.sh)) * 3 + axis_region(x_rolled, g.Wp, g.ww, g.sw);
  return tok;
}

__device__ __forceinline__ int64_t offset(const Strides& s, const Token& t, int head) {
  return t.batch * s.b + t.y * s.h + t.x * s.w + head * s.n;
}

// Whether the token is a key: an image position, or padding with pad vectors.
__device__ __forceinline__ bool is_key(const Geometry& g, const Token& t) {
  return g.has_pad ? t.inside : t.real;
}

// Token info in one int: -1 for no key (outside the window, or padding the op excludes),
// the token's shift region for an image token, region + kPadKey for padding that is a key
// (pad_kv) but no query. Regions are 0..26 (three per axis of a 3D window).
constexpr int kPadKey = 32;
__device__ __forceinline__ int pack_token(const Geometry& g, const Token& t) {
  if (t.real) return t.region;
  return g.has_pad && t.inside ? t.region + kPadKey : -1;
}

// Whether the pair (i, j) with packed infos ti, tj is attended: i a query, j a key, one
// shift region.
__device__ __forceinline__ bool packed_pair_allowed(int ti, int tj) {
  return ti >= 0 && ti < kPadKey && tj >= 0 && ti == tj % kPadKey;
}

// Bias of the in-window token pair (i, j), both < tokens, with table coordinates ai and aj
// (table_pos). bias is float: a relative position table (((2wt-1) (2wh-1) (2ww-1), heads),
// frame offset slowest: torchvision's 3D order, Swin's 2D one when wt = 1) or a (heads, N,
// N) dense tensor, both contiguous. It does not depend on the window.
__device__ __forceinline__ float bias_at(const float* bias, int kind, const Geometry& g, int head, int i, int j,
                                         int ai, int aj) {
  if (kind == kBiasTable) {
    const int center = ((g.wt - 1) * (2 * g.wh - 1) + g.wh - 1) * (2 * g.ww - 1) + g.ww - 1;
    return bias[(ai - aj + center) * g.heads + head];
  }
  if (kind == kBiasDense) return bias[(static_cast<int64_t>(head) * g.tokens + i) * g.tokens + j];
  return 0.f;
}

}  // namespace
}  // namespace ultron
