// The vectors of the native kernels: GCC/clang vector extensions of one register's width, kLanes
// floats (16 on AVX-512, 8 on AVX2), and the few lane-wise and cross-lane functions they need.
// One register on purpose: GCC lowers wider vectors' compares, selects and shuffles to scalar code
// (the 16-lane kernels on an AVX2 host: row_max 17x, the norms 2-4x slower than 8 lanes).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || !defined(__AVX2__)
#define DEEPSPLIT_LANES 16  // one zmm register (elsewhere: what the compiler lowers 64 bytes to)
#else
#define DEEPSPLIT_LANES 8  // one ymm register
#include <immintrin.h>
#endif

namespace deepsplit {

constexpr int kLanes = DEEPSPLIT_LANES;

// vu is the same vector as vf at float alignment, for loads and stores anywhere
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef float vu __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vu*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }

// lane l holds l
inline vi iota() {
  vi v{};
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}

// ask for the cache lines of n floats at p ahead of their use
inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);  // 16 floats: one 64-byte line
}

// lane-wise a > b ? a : b
inline vf vmax(vf a, vf b) {
#if DEEPSPLIT_LANES == 8
  return _mm256_max_ps(a, b);  // a ternary next to a compare a > b is merged into its blend
#else
  return a > b ? a : b;
#endif
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, v[l]);
  return m;
}

// kLanes vectors -> one vector of their sums (lane t = sum of the lanes of v[t]), by pairwise
// shuffles and adds; v is clobbered.
#if DEEPSPLIT_LANES == 16
inline vf transpose_sum(vf* v) {
  for (int i = 0; i < 8; ++i)  // lanes 0-7: token 2i, 8-15: token 2i+1
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                   23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                   30, 31);
  for (int i = 0; i < 4; ++i)  // 4 lanes per token
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                                   27) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                   31);
  for (int i = 0; i < 2; ++i)  // 2 lanes per token
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                                   29) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                   31);
  return __builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
// within 128-bit halves first (vshufps), across them last (vperm2f128)
inline vf transpose_sum(vf* v) {
  for (int i = 0; i < 4; ++i)  // per half: lanes 0-1 token 2i, 2-3 token 2i+1
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  for (int i = 0; i < 2; ++i)  // per half: lane u token 4i + u
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 3, 9, 11, 5, 7, 13, 15);
  return __builtin_shufflevector(v[0], v[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(v[0], v[1], 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

// exp(x), lane-wise (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-5 polynomial in r, times 2^n;
// relative error ~1e-7). 0 below -87 and e^88 above 88, where 2^n would leave the normal range.
inline vf vexp(vf x0) {
  const vf x = x0 < -87.0f ? splat(-87.0f) : (x0 > 88.0f ? splat(88.0f) : x0);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vi ni = (vi)t - (vi)magic;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * r * r + r + 1.0f;
  const vf e = y * (vf)((ni + 127) << 23);
  return x0 < -87.0f ? vf{} : e;
}

}  // namespace deepsplit
