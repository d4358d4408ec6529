// PA forward and backward on channels-last (NHWC) tensors, for the cpu backend (dispatched from
// pa_cpu.cpp). Why a second layout: the ResT models run their convolutions channels-last on the CPU
// (oneDNN's direct convolutions are 1.3-7x faster than on NCHW, see rest/layout.py), and a PA
// that made its input NCHW would pay two full copies of the map and hand the next layer the slow
// layout.
//
// Channels are innermost, so every loop vectorises over C: for one vector of channels at a time, a
// row's gate logits z = bias + sum over the valid 3x3 neighbours of w[tap] * x[neighbour] (taps
// outside the image are skipped, the same as multiplying by the zero padding) with that vector's 9
// weights held in registers, then s = sigmoid(z) and out = x * s over the row. The weight is
// tap-major (9, C) so that a tap's C weights are contiguous.
//
// Tasks are blocks of rows of one image, their size fixed by the shape (never by the thread count).
// The backward recomputes the gate: a task forms dz = dout * x * s (1 - s) for its rows plus one halo
// row above and below (dx at a row needs dz of its neighbours), then dx = dout * s + sum_t w[t] dz[p -
// off_t]; the dweight / dbias partial sums of a task cover its own rows only and are reduced over
// tasks in task order, in double: deterministic whatever the thread count.
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "pa_common.h"
#include "parallel.h"
#include "simd.h"

namespace rest_cpu {
namespace {

// Pixels per block of a row: the loops run one vector of channels at a time over a block, so the block's
// 3 rows x kPixelBlock pixels x C channels stay in L1/L2 while every channel vector passes over them.
constexpr int64_t kPixelBlock = 16;

// Row yy of an image (x0 = its first value, rows of W x C values), or null outside the image.
template <typename T>
inline const T* row_or_null(const T* x0, int64_t yy, int64_t H, int64_t rowlen) {
  return (yy >= 0 && yy < H) ? x0 + yy * rowlen : nullptr;
}

// Calls f(V{}, c, u0, u1, load, store) for every block [u0, u1) of kPixelBlock pixels of a row of W
// and, within it, every vector of channels at c (V = vec_t<T>, vload, vstore), then every channel of
// the tail (V = T, scalar load and store): the loop order of all the kernels below.
template <typename T, typename F>
inline void for_each_block(int64_t W, int64_t C, F f) {
  constexpr int Wd = Simd<T>::W;
  // lambdas rather than function pointers: each is its own type, so the calls always inline
  const auto vec_load = [](const T* p) { return vload<T>(p); };
  const auto vec_store = [](T* p, vec_t<T> v) { vstore<T>(p, v); };
  const auto load = [](const T* p) { return *p; };
  const auto store = [](T* p, T v) { *p = v; };
  for (int64_t u0 = 0; u0 < W; u0 += kPixelBlock) {
    const int64_t u1 = std::min(W, u0 + kPixelBlock);
    int64_t c = 0;
    for (; c + Wd <= C; c += Wd) f(vec_t<T>{}, c, u0, u1, vec_load, vec_store);
    for (; c < C; ++c) f(T{}, c, u0, u1, load, store);
  }
}

// Rows per task: at least ~32K values of work, at least 4 rows so that the backward's two halo rows
// are a modest overhead; a function of the shape only.
inline int64_t rows_per_task(int64_t H, int64_t W, int64_t C) {
  const int64_t row = std::max<int64_t>(1, W * C);
  return std::min<int64_t>(std::max<int64_t>(1, H), std::max<int64_t>(4, (32768 + row - 1) / row));
}

// The gate logits of one vector of channels [c, c + L) (L = V's lanes: a SIMD vector, or 1 for the
// channel tail) along row y: z[u] = bias + sum over the valid taps, in tap order, of w[tap] *
// x[neighbour]. rows[dy] is image row y + dy - 1, or null outside the image. The 9 weights and the bias
// stay in registers for the whole row; taps outside the image are skipped (the zero padding).
template <typename T, typename V, typename Load, typename Store>
inline void gate_logits_along_row(const T* const rows[3], const T* w9c, const T* bias, int64_t c, int64_t u0,
                                  int64_t u1, int64_t W, int64_t C, T* z, Load load, Store store) {
  V w[9];
  for (int t = 0; t < 9; ++t) w[t] = load(w9c + t * C + c);
  const V b = load(bias + c);
  for (int64_t u = u0; u < u1; ++u) {
    V acc = b;
    for (int dy = 0; dy < 3; ++dy) {
      if (rows[dy] == nullptr) continue;
      const T* p = rows[dy] + u * C + c;
      if (u > 0) acc += w[dy * 3] * load(p - C);
      acc += w[dy * 3 + 1] * load(p);
      if (u + 1 < W) acc += w[dy * 3 + 2] * load(p + C);
    }
    store(z + u * C + c, acc);
  }
}

// s = sigmoid(gate logits) for the W pixels of row y of one image (x0 = that image's first value).
template <typename T>
inline void gate_row(const T* x0, const T* w9c, const T* bias, int64_t y, int64_t H, int64_t W, int64_t C, T* s) {
  const T* rows[3];
  for (int dy = 0; dy < 3; ++dy) rows[dy] = row_or_null(x0, y + dy - 1, H, W * C);
  for_each_block<T>(W, C, [&](auto v, int64_t c, int64_t u0, int64_t u1, auto load, auto store) {
    gate_logits_along_row<T, decltype(v)>(rows, w9c, bias, c, u0, u1, W, C, s, load, store);
  });
  sigmoid_row(s, s, W * C);
}

// dx along row y for channels [c, c + L): dx = dout * s + sum_t w[t] dz[(y, u) - off_t], t ascending
// (the NCHW kernel's order). Tap t = 3 r + j (dy = r - 1, dx = j - 1) reads dz at row y + 1 - r
// (dzrows[r], null outside the image) and column u + 1 - j.
template <typename T, typename V, typename Load, typename Store>
inline void dx_along_row(const T* const dzrows[3], const T* w9c, const T* g, const T* s, int64_t c, int64_t u0,
                         int64_t u1, int64_t W, int64_t C, T* out, Load load, Store store) {
  V w[9];
  for (int t = 0; t < 9; ++t) w[t] = load(w9c + t * C + c);
  for (int64_t u = u0; u < u1; ++u) {
    V acc = V{};
    for (int r = 0; r < 3; ++r) {
      if (dzrows[r] == nullptr) continue;
      const T* p = dzrows[r] + u * C + c;
      if (u + 1 < W) acc += w[r * 3] * load(p + C);
      acc += w[r * 3 + 1] * load(p);
      if (u > 0) acc += w[r * 3 + 2] * load(p - C);
    }
    store(out + u * C + c, load(g + u * C + c) * load(s + u * C + c) + acc);
  }
}

// Adds to acc, for channels [c, c + L), the sums over rows [y0, y1) and columns [u0, u1) of one
// image: acc[t] += sum_p dz[p] x[p + off_t] (dweight, taps outside the image skipped) and acc[9] +=
// sum_p dz[p] (dbias), pixels in row-major order; dz_own holds dz of rows y0.. contiguously. The 10
// sums stay in registers over the block.
template <typename T, typename V, typename Load, typename Store>
inline void dweight_along_rows(const T* x0, const T* dz_own, int64_t y0, int64_t y1, int64_t u0, int64_t u1, int64_t H,
                               int64_t W, int64_t C, int64_t c, T* acc, Load load, Store store) {
  V a[9];
  for (int t = 0; t < 9; ++t) a[t] = load(acc + t * C + c);
  V db = load(acc + 9 * C + c);
  for (int64_t y = y0; y < y1; ++y) {
    const T* rows[3];
    for (int r = 0; r < 3; ++r) rows[r] = row_or_null(x0, y + r - 1, H, W * C);
    const T* drow = dz_own + (y - y0) * W * C;
    for (int64_t u = u0; u < u1; ++u) {
      const V d = load(drow + u * C + c);
      for (int r = 0; r < 3; ++r) {
        if (rows[r] == nullptr) continue;
        const T* p = rows[r] + u * C + c;
        if (u > 0) a[r * 3] += d * load(p - C);
        a[r * 3 + 1] += d * load(p);
        if (u + 1 < W) a[r * 3 + 2] += d * load(p + C);
      }
      db += d;
    }
  }
  for (int t = 0; t < 9; ++t) store(acc + t * C + c, a[t]);
  store(acc + 9 * C + c, db);
}

}  // namespace

// S: x's and out's element type: T, or bfloat16 / float16, whose rows a task widens to T (exactly)
// into a buffer of its rows plus the halo, and whose out is rounded once from T as it is written: the
// same bits as the kernel run on a T copy of x, without that copy's round trip through memory.
template <typename T, typename S>
at::Tensor pa_fwd_nhwc(const at::Tensor& x, const at::Tensor& w9c, const at::Tensor& b) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const S* xp = x.data_ptr<S>();
  const T* wp = w9c.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  S* op = out.data_ptr<S>();
  const int64_t R = rows_per_task(H, W, C), blocks = (H + R - 1) / R, rowlen = W * C;
  constexpr bool widen = !std::is_same_v<S, T>;
  struct Buffers {
    std::vector<T> s, xw;  // the gate of a row; widened: the task's rows of x plus the halo
  };
  auto make = [&] { return Buffers{std::vector<T>(rowlen), std::vector<T>(widen ? (R + 2) * rowlen : 0)}; };
  parallel_tasks(B * blocks, make, [&](int64_t task, Buffers& buf) {
    const int64_t bb = task / blocks, y0 = (task % blocks) * R, y1 = std::min(H, y0 + R);
    const S* x0 = xp + bb * H * rowlen;
    T* s = buf.s.data();
    if constexpr (!widen) {
      for (int64_t y = y0; y < y1; ++y) {
        gate_row(x0, wp, bp, y, H, W, C, s);
        const T* xr = x0 + y * rowlen;
        T* o = op + (bb * H + y) * rowlen;
        for (int64_t i = 0; i < rowlen; ++i) o[i] = xr[i] * s[i];
      }
    } else {
      // Rows [ya, yb) hold every image row a gate of rows [y0, y1) reads, so the buffer can stand for
      // an image of yb - ya rows: a neighbour outside it is outside the image too.
      const int64_t ya = std::max<int64_t>(0, y0 - 1), yb = std::min(H, y1 + 1);
      T* xw = buf.xw.data();
      const S* src = x0 + ya * rowlen;
      for (int64_t i = 0; i < (yb - ya) * rowlen; ++i) xw[i] = T(src[i]);
      for (int64_t y = y0; y < y1; ++y) {
        gate_row<T>(xw, wp, bp, y - ya, yb - ya, W, C, s);
        const T* xr = xw + (y - ya) * rowlen;
        S* o = op + (bb * H + y) * rowlen;
        for (int64_t i = 0; i < rowlen; ++i) o[i] = S(xr[i] * s[i]);
      }
    }
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_nhwc(const at::Tensor& dout, const at::Tensor& x,
                                                           const at::Tensor& w9c, const at::Tensor& b) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor g = dout.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* xp = x.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  const T* wp = w9c.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const int64_t R = rows_per_task(H, W, C), blocks = (H + R - 1) / R, rowlen = W * C;
  const int64_t tasks = B * blocks;
  // Per task: 9 dweight rows and the dbias row, C values each, in double.
  std::vector<double> part(tasks * 10 * C, 0.0);
  struct Buffers {
    std::vector<T> s, dz, acc;  // s of the task's rows; dz of its rows plus halo; (10, C) row sums
  };
  auto make = [&] {
    return Buffers{std::vector<T>(R * rowlen), std::vector<T>((R + 2) * rowlen), std::vector<T>(10 * C)};
  };
  parallel_tasks(tasks, make, [&](int64_t task, Buffers& buf) {
    const int64_t bb = task / blocks, y0 = (task % blocks) * R, y1 = std::min(H, y0 + R);
    const int64_t ya = std::max<int64_t>(0, y0 - 1), yb = std::min(H, y1 + 1);
    const T* x0 = xp + bb * H * rowlen;
    const T* g0 = gp + bb * H * rowlen;
    // dz rows ya..yb-1 live at dz + (y - ya) * rowlen; halo rows need their gate only transiently.
    T* dz = buf.dz.data();
    for (int64_t y = ya; y < yb; ++y) {
      const bool own = y >= y0 && y < y1;
      T* s = own ? buf.s.data() + (y - y0) * rowlen : dz + (y - ya) * rowlen;  // halo: s in place of dz
      gate_row(x0, wp, bp, y, H, W, C, s);
      const T* xr = x0 + y * rowlen;
      const T* gr = g0 + y * rowlen;
      T* d = dz + (y - ya) * rowlen;
      for (int64_t i = 0; i < rowlen; ++i) d[i] = gr[i] * xr[i] * s[i] * (T(1) - s[i]);
    }
    // dweight / dbias over the task's own rows, then dx for them, one vector of channels at a time.
    T* acc = buf.acc.data();
    const T* dz_own = dz + (y0 - ya) * rowlen;
    std::fill(acc, acc + 10 * C, T(0));
    for_each_block<T>(W, C, [&](auto v, int64_t c, int64_t u0, int64_t u1, auto load, auto store) {
      dweight_along_rows<T, decltype(v)>(x0, dz_own, y0, y1, u0, u1, H, W, C, c, acc, load, store);
    });
    for (int64_t y = y0; y < y1; ++y) {
      const T* dzrows[3];  // dz rows y + 1, y, y - 1 (see dx_along_row), null outside the image
      // dz holds image rows [ya, yb), which are all of y's rows inside the image
      for (int r = 0; r < 3; ++r) dzrows[r] = row_or_null<T>(dz, y + 1 - r - ya, yb - ya, rowlen);
      const T* s = buf.s.data() + (y - y0) * rowlen;
      const T* gr = g0 + y * rowlen;
      T* o = dxp + (bb * H + y) * rowlen;
      for_each_block<T>(W, C, [&](auto v, int64_t c, int64_t u0, int64_t u1, auto load, auto store) {
        dx_along_row<T, decltype(v)>(dzrows, wp, gr, s, c, u0, u1, W, C, o, load, store);
      });
    }
    double* pp = part.data() + task * 10 * C;
    for (int64_t i = 0; i < 10 * C; ++i) pp[i] = double(acc[i]);
  });
  // Sum the task partials in task order (fixed), then lay dweight out as (C, 1, 3, 3).
  std::vector<double> total(10 * C, 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < 10 * C; ++i) total[i] += part[t * 10 * C + i];
  at::Tensor dw = at::empty({C, 1, 3, 3}, x.options());
  at::Tensor db = at::empty({C}, x.options());
  T* dwp = dw.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    for (int t = 0; t < 9; ++t) dwp[c * 9 + t] = T(total[t * C + c]);
    dbp[c] = T(total[9 * C + c]);
  }
  return {dx, dw, db};
}

template at::Tensor pa_fwd_nhwc<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
template at::Tensor pa_fwd_nhwc<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
template at::Tensor pa_fwd_nhwc<float, at::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
template at::Tensor pa_fwd_nhwc<float, at::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
template std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_nhwc<float>(const at::Tensor&, const at::Tensor&,
                                                                           const at::Tensor&, const at::Tensor&);
template std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_nhwc<double>(const at::Tensor&, const at::Tensor&,
                                                                            const at::Tensor&, const at::Tensor&);

}  // namespace rest_cpu
