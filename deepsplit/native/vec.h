// 16-float vectors for the native kernels: GCC/clang vector extensions, lowered to whatever the CPU
// has (one AVX-512 register, two AVX2 ones, ...), and the few lane-wise functions they need.
#pragma once

#include <algorithm>
#include <cstdint>

namespace deepsplit {

// vu is the same vector as vf at float alignment, for loads and stores anywhere
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vu __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

inline vf load(const float* p) { return *reinterpret_cast<const vu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vu*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }

// ask for the cache lines of n floats at p ahead of their use
inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) __builtin_prefetch(p + i);
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
