// PA forward and backward on channels-last (NHWC) tensors, for the cpu backend (dispatched from
// pa_cpu.cpp). Why a second layout: the ResT models run their convolutions channels-last on the CPU
// (oneDNN's direct convolutions are 1.3-7x faster than on NCHW, see rest/models.py), and a PA
// that made its input NCHW would pay two full copies of the map and hand the next layer the slow
// layout.
//
// Channels are innermost, so every loop vectorises over C: for one pixel, z = bias + sum over its
// valid 3x3 neighbours of w[tap] * x[neighbour] (taps outside the image are skipped, the same as
// multiplying by the zero padding), then s = sigmoid(z) and out = x * s. The weight is tap-major
// (9, C) so that a tap's C weights are contiguous.
//
// Tasks are blocks of rows of one image, their size fixed by the shape (never by the thread count).
// The backward recomputes the gate: a task forms dz = dout * x * s (1 - s) for its rows plus one halo
// row above and below (dx at a row needs dz of its neighbours), then dx = dout * s + sum_t w[t] dz[p -
// off_t]; the dweight / dbias partial sums of a task cover its own rows only and are reduced over
// tasks in task order, in double: deterministic whatever the thread count.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "pa_common.h"
#include "parallel.h"
#include "simd.h"

namespace rest_cpu {
namespace {

// Rows per task: at least ~32K values of work, at least 4 rows so that the backward's two halo rows
// are a modest overhead; a function of the shape only.
inline int64_t rows_per_task(int64_t H, int64_t W, int64_t C) {
  const int64_t row = std::max<int64_t>(1, W * C);
  return std::min<int64_t>(std::max<int64_t>(1, H), std::max<int64_t>(4, (32768 + row - 1) / row));
}

// The valid 3x3 neighbours of pixel (y, u): for each, the tap index t = (dy + 1) * 3 + (dx + 1) and
// the pixel offset dy * W + dx. Returns how many (9 inside the image, fewer on its border).
inline int neighbours(int64_t y, int64_t u, int64_t H, int64_t W, int* tap, int64_t* off) {
  int n = 0;
  for (int dy = -1; dy <= 1; ++dy) {
    if (y + dy < 0 || y + dy >= H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      if (u + dx < 0 || u + dx >= W) continue;
      tap[n] = (dy + 1) * 3 + (dx + 1);
      off[n] = dy * W + dx;
      ++n;
    }
  }
  return n;
}

// z[c] = bias[c] + sum_k w9c[tap[k]][c] * px[off[k] * C + c] over the n valid taps, in tap order,
// for the C channels of one pixel (px points at the pixel itself).
template <typename T>
inline void gate_logits(const T* px, const T* w9c, const T* bias, const int* tap, const int64_t* off, int n,
                        int64_t C, T* z) {
  constexpr int Wd = Simd<T>::W;
  const T* xs[9];
  const T* ws[9];
  for (int k = 0; k < n; ++k) {
    xs[k] = px + off[k] * C;
    ws[k] = w9c + tap[k] * C;
  }
  int64_t c = 0;
  for (; c + Wd <= C; c += Wd) {
    vec_t<T> acc = vload(bias + c);
    for (int k = 0; k < n; ++k) acc += vload(ws[k] + c) * vload(xs[k] + c);
    vstore(z + c, acc);
  }
  for (; c < C; ++c) {
    T acc = bias[c];
    for (int k = 0; k < n; ++k) acc += ws[k][c] * xs[k][c];
    z[c] = acc;
  }
}

// s = sigmoid(gate logits) for the W pixels of row y of one image (x0 = that image's first value).
template <typename T>
inline void gate_row(const T* x0, const T* w9c, const T* bias, int64_t y, int64_t H, int64_t W, int64_t C, T* s) {
  int tap[9];
  int64_t off[9];
  for (int64_t u = 0; u < W; ++u) {
    const int n = neighbours(y, u, H, W, tap, off);
    gate_logits(x0 + (y * W + u) * C, w9c, bias, tap, off, n, C, s + u * C);
  }
  sigmoid_row(s, s, W * C);
}

}  // namespace

template <typename T>
at::Tensor pa_fwd_nhwc(const at::Tensor& x, const at::Tensor& w9c, const at::Tensor& b) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* xp = x.data_ptr<T>();
  const T* wp = w9c.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t R = rows_per_task(H, W, C), blocks = (H + R - 1) / R, rowlen = W * C;
  auto make = [&] { return std::vector<T>(rowlen); };
  parallel_tasks(B * blocks, make, [&](int64_t task, std::vector<T>& s) {
    const int64_t bb = task / blocks, y0 = (task % blocks) * R, y1 = std::min(H, y0 + R);
    const T* x0 = xp + bb * H * rowlen;
    for (int64_t y = y0; y < y1; ++y) {
      gate_row(x0, wp, bp, y, H, W, C, s.data());
      const T* xr = x0 + y * rowlen;
      T* o = op + (bb * H + y) * rowlen;
      for (int64_t i = 0; i < rowlen; ++i) o[i] = xr[i] * s[i];
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
    constexpr int Wd = Simd<T>::W;
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
    // dweight / dbias over the task's own rows; dx for them.
    T* acc = buf.acc.data();
    std::fill(acc, acc + 10 * C, T(0));
    int tap[9];
    int64_t off[9];
    for (int64_t y = y0; y < y1; ++y) {
      const T* s = buf.s.data() + (y - y0) * rowlen;
      const T* gr = g0 + y * rowlen;
      for (int64_t u = 0; u < W; ++u) {
        const int n = neighbours(y, u, H, W, tap, off);
        const int64_t p = y * W + u;                 // pixel index in the image
        const T* dzp = dz + (p - ya * W) * C;        // dz at this pixel
        const T* xpx = x0 + p * C;
        T* o = dxp + (bb * H * W + p) * C;
        const T* sp = s + u * C;
        const T* gpx = gr + u * C;
        int64_t c = 0;
        for (; c + Wd <= C; c += Wd) {
          const vec_t<T> d = vload(dzp + c);
          vec_t<T> sum = vset<T>(T(0));
          for (int k = 0; k < n; ++k) {
            const int t = tap[k];
            vstore(acc + t * C + c, vload(acc + t * C + c) + d * vload(xpx + off[k] * C + c));
          }
          // dx at p gathers w[t] dz[p - off_t]; p - off_t is the valid neighbour p + off[k] with
          // t = 8 - tap[k] (offsets are symmetric). Reverse order: t ascending, as in the NCHW kernel.
          for (int k = n - 1; k >= 0; --k) sum += vload(wp + (8 - tap[k]) * C + c) * vload(dzp + off[k] * C + c);
          vstore(acc + 9 * C + c, vload(acc + 9 * C + c) + d);
          vstore(o + c, vload(gpx + c) * vload(sp + c) + sum);
        }
        for (; c < C; ++c) {
          T sum = T(0);
          for (int k = 0; k < n; ++k) acc[tap[k] * C + c] += dzp[c] * xpx[off[k] * C + c];
          for (int k = n - 1; k >= 0; --k) sum += wp[(8 - tap[k]) * C + c] * dzp[off[k] * C + c];
          acc[9 * C + c] += dzp[c];
          o[c] = gpx[c] * sp[c] + sum;
        }
      }
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
template std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_nhwc<float>(const at::Tensor&, const at::Tensor&,
                                                                           const at::Tensor&, const at::Tensor&);
template std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_nhwc<double>(const at::Tensor&, const at::Tensor&,
                                                                            const at::Tensor&, const at::Tensor&);

}  // namespace rest_cpu
