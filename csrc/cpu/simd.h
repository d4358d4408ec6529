// Portable SIMD for the cpu backend: GCC/Clang vector extensions as wide as the target's registers
// (64 bytes with AVX-512, 32 with AVX/AVX2, else 16), plus a vectorised exp. No intrinsics, so the
// same source builds for any x86-64 or AArch64 target. Why not 64 bytes everywhere: GCC lowers a
// vector wider than the hardware's through the stack and general registers (scalar * vector builds
// its broadcast lane by lane), which made the cpu kernels 2-9x slower than eager PyTorch on an AVX2
// Zen 3 EPYC.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#define REST_CPU_VEC_BYTES 64
#elif defined(__AVX__)
#define REST_CPU_VEC_BYTES 32
#else
#define REST_CPU_VEC_BYTES 16
#endif

namespace rest_cpu {

template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float vec __attribute__((vector_size(REST_CPU_VEC_BYTES)));
  typedef int32_t ivec __attribute__((vector_size(REST_CPU_VEC_BYTES)));
  static constexpr int W = REST_CPU_VEC_BYTES / 4;
};
template <> struct Simd<double> {
  typedef double vec __attribute__((vector_size(REST_CPU_VEC_BYTES)));
  typedef int64_t ivec __attribute__((vector_size(REST_CPU_VEC_BYTES)));
  static constexpr int W = REST_CPU_VEC_BYTES / 8;
};

template <typename T> using vec_t = typename Simd<T>::vec;

template <typename T>
inline __attribute__((always_inline)) vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline __attribute__((always_inline)) void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline __attribute__((always_inline)) vec_t<T> vset(T s) {
  return vec_t<T>{} + s;
}
template <typename T>
inline __attribute__((always_inline)) vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}

// Horizontal sum / max by halving (fixed pairing: the result depends only on the lanes).
#if defined(__GNUC__) && !defined(__clang__) && REST_CPU_VEC_BYTES == 64
inline __attribute__((always_inline)) float hsum(vec_t<float> v) {
  typedef Simd<float>::ivec iv;
  v += __builtin_shuffle(v, iv{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, iv{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, iv{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, iv{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}
inline __attribute__((always_inline)) double hsum(vec_t<double> v) {
  typedef Simd<double>::ivec iv;
  v += __builtin_shuffle(v, iv{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, iv{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, iv{1, 0, 3, 2, 5, 4, 7, 6});
  return v[0];
}
inline __attribute__((always_inline)) float hmax(vec_t<float> v) {
  typedef Simd<float>::ivec iv;
  v = vmax<float>(v, __builtin_shuffle(v, iv{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = vmax<float>(v, __builtin_shuffle(v, iv{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = vmax<float>(v, __builtin_shuffle(v, iv{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = vmax<float>(v, __builtin_shuffle(v, iv{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}
inline __attribute__((always_inline)) double hmax(vec_t<double> v) {
  typedef Simd<double>::ivec iv;
  v = vmax<double>(v, __builtin_shuffle(v, iv{4, 5, 6, 7, 0, 1, 2, 3}));
  v = vmax<double>(v, __builtin_shuffle(v, iv{2, 3, 0, 1, 6, 7, 4, 5}));
  v = vmax<double>(v, __builtin_shuffle(v, iv{1, 0, 3, 2, 5, 4, 7, 6}));
  return v[0];
}
#else
// Other compilers and vector widths: the same halving order on an array.
template <typename V, typename T = decltype(V{}[0] + 0)>
inline T halve_reduce(V v, bool is_max) {
  constexpr int W = sizeof(V) / sizeof(T);
  T t[W];
  std::memcpy(t, &v, sizeof(v));
  for (int s = W / 2; s >= 1; s /= 2)
    for (int i = 0; i < s; ++i) t[i] = is_max ? (t[i + s] > t[i] ? t[i + s] : t[i]) : t[i] + t[i + s];
  return t[0];
}
inline float hsum(vec_t<float> v) { return halve_reduce(v, false); }
inline double hsum(vec_t<double> v) { return halve_reduce(v, false); }
inline float hmax(vec_t<float> v) { return halve_reduce(v, true); }
inline double hmax(vec_t<double> v) { return halve_reduce(v, true); }
#endif

// Lanes [0, n) true, the rest false (n in [0, W]).
template <typename T>
inline __attribute__((always_inline)) typename Simd<T>::ivec lanes_below(int64_t n) {
  typename Simd<T>::ivec idx;
  for (int i = 0; i < Simd<T>::W; ++i) idx[i] = i;
  return idx < (typename Simd<T>::ivec{} + (int)n);
}


// exp(x) = 2^n * p(r), n = round(x / ln2), r = x - n ln2 (ln2 split in two for exactness).
// float: Cephes' degree-6 polynomial (about 1 ulp); double: degree-12 Taylor (|r| <= ln2/2, error
// below 2e-16 relative). Inputs are clamped to the normal range: softmax only feeds x <= 0 and
// values below -87 (float) / -708 (double) contribute nothing next to the row maximum's exp(0) = 1.
inline __attribute__((always_inline)) vec_t<float> vexp(vec_t<float> x) {
  typedef Simd<float>::ivec ivec;
  x = x < vset<float>(-87.3f) ? vset<float>(-87.3f) : x;
  x = x > vset<float>(88.7f) ? vset<float>(88.7f) : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  vec_t<float> n = (x * 1.44269504088896341f + magic) - magic;
  vec_t<float> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec_t<float> p = vset<float>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec_t<float> scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

inline __attribute__((always_inline)) vec_t<double> vexp(vec_t<double> x) {
  typedef Simd<double>::ivec ivec;
  x = x < vset<double>(-708.0) ? vset<double>(-708.0) : x;
  x = x > vset<double>(709.0) ? vset<double>(709.0) : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  vec_t<double> n = (x * 1.4426950408889634074 + magic) - magic;
  vec_t<double> r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  // Taylor series of exp(r) to degree 12, Horner form.
  vec_t<double> p = vset<double>(1.0 / 479001600.0);
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  ivec e = (__builtin_convertvector(n, ivec) + 1023) << 52;
  vec_t<double> scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// log(x) of positive normal floats: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log x = e ln2 +
// log1p(m - 1), log1p by Cephes' logf polynomial (about 1 ulp; ln2 split in two as in vexp). Used for
// the softmax statistics (the log of a row's mean exp, in (1/M, 1]); no zero, negative, denormal or
// non-finite input reaches it.
inline __attribute__((always_inline)) vec_t<float> vlog(vec_t<float> x) {
  typedef Simd<float>::ivec ivec;
  ivec bits;
  std::memcpy(&bits, &x, sizeof(bits));
  ivec e = ((bits >> 23) & 0xff) - 126;  // x = 2^e * m, m in [0.5, 1)
  ivec mb = (bits & 0x007fffff) | 0x3f000000;
  vec_t<float> m;
  std::memcpy(&m, &mb, sizeof(m));
  const auto small = m < vset<float>(0.707106781186547524f);  // m in [0.5, sqrt(1/2)): use 2m, e - 1
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const vec_t<float> fe = __builtin_convertvector(e, vec_t<float>);
  const vec_t<float> z = m * m;
  vec_t<float> y = vset<float>(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - z * 0.5f;
  return m + y + fe * 0.693359375f;
}

// Scalar exp of the same accuracy as the vector lanes (used for row tails), so that a value does not
// change with its position in a row.
template <typename T>
inline T sexp(T x) {
  constexpr int W = Simd<T>::W;
  T t[W] = {};
  t[0] = x;
  vec_t<T> v = vload(t);
  v = vexp(v);
  vstore(t, v);
  return t[0];
}

// Whole vectors of a map's elements widened to float32 / rounded back: exact widening, and the
// narrowing c10's conversions do lane by lane (bfloat16: round to nearest even, NaN to 0x7fc0), so a
// vectorised loop writes the same bits as the scalar `S(float)` in its tail. The scalar conversions
// of c10::BFloat16 do not vectorise (their NaN branch), which left the loops that used them 3-4x
// slower than float32 ones. float16 goes lane by lane through c10::Half (no vector conversion
// without F16C / AVX512-FP16 intrinsics, and the models' deployment dtype is bfloat16).
template <typename S>
inline __attribute__((always_inline)) vec_t<float> load_widened(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return vload<float>(p);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    typedef uint16_t hvec __attribute__((vector_size(REST_CPU_VEC_BYTES / 2)));
    typedef uint32_t uvec __attribute__((vector_size(REST_CPU_VEC_BYTES)));
    hvec h;
    std::memcpy(&h, p, sizeof(h));
    const uvec u = __builtin_convertvector(h, uvec) << 16;
    vec_t<float> f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    float t[Simd<float>::W];
    for (int i = 0; i < Simd<float>::W; ++i) t[i] = float(p[i]);
    return vload<float>(t);
  }
}

template <typename S>
inline __attribute__((always_inline)) void store_narrowed(S* p, vec_t<float> f) {
  if constexpr (std::is_same_v<S, float>) {
    vstore<float>(p, f);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    typedef uint16_t hvec __attribute__((vector_size(REST_CPU_VEC_BYTES / 2)));
    typedef uint32_t uvec __attribute__((vector_size(REST_CPU_VEC_BYTES)));
    uvec u;
    std::memcpy(&u, &f, sizeof(u));
    uvec r = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;  // round to nearest even
    r = f != f ? (uvec{} + 0x7fc0u) : r;               // NaN, as c10::BFloat16
    const hvec h = __builtin_convertvector(r, hvec);
    std::memcpy(p, &h, sizeof(h));
  } else {
    float t[Simd<float>::W];
    vstore<float>(t, f);
    for (int i = 0; i < Simd<float>::W; ++i) p[i] = S(t[i]);
  }
}

}  // namespace rest_cpu
