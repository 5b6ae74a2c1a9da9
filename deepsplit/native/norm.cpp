// RMSNorm over rows, alone, after a residual add, or per head followed by rotary embedding (the
// q/k path of attention): one pass each instead of torch's chain of small ops. Single-threaded on
// purpose: decode rows are few and a parallel region costs more than the work.
// Registered as torch.ops.deepsplit.{rms_norm, add_rms_norm, norm_rope}.
#include "vec.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

using namespace deepsplit;

// 1 / sqrt(mean(x^2) + eps) of one row of d floats (d % 16 == 0)
inline float inv_rms(const float* x, int64_t d, float eps) {
  vf ss = vf{};
  for (int64_t c = 0; c < d; c += kLanes) {
    const vf v = load(x + c);
    ss += v * v;
  }
  return 1.0f / std::sqrt(hsum(ss) / static_cast<float>(d) + eps);
}

// out = w * (x * r)
inline void scale_row(const float* x, float r, const float* w, int64_t d, float* out) {
  for (int64_t c = 0; c < d; c += kLanes) store(out + c, load(w + c) * (load(x + c) * r));
}

void check(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.is_contiguous(), op,
              ": float32");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == w.numel() && x.size(1) % kLanes == 0, op,
              ": x [R, d] with contiguous rows, d % 16 == 0");
}

// x [R, d] (rows may be strided) -> w * x / rms(x) per row, [R, d]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w, "rms_norm");
  const int64_t R = x.size(0), d = x.size(1), ld = x.stride(0);
  at::Tensor out = at::empty({R, d}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    scale_row(xp + r * ld, inv_rms(xp + r * ld, d, static_cast<float>(eps)), wp, d, op + r * d);
  return out;
}

// h, delta [R, d] -> (h + delta, rms_norm(h + delta))
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w,
                                                double eps) {
  check(h, w, "add_rms_norm");
  check(delta, w, "add_rms_norm");
  TORCH_CHECK(h.size(0) == delta.size(0), "add_rms_norm: shapes");
  const int64_t R = h.size(0), d = h.size(1);
  at::Tensor sum = at::empty({R, d}, h.options()), out = at::empty({R, d}, h.options());
  const float *hp = h.data_ptr<float>(), *dp = delta.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    float* s = sp + r * d;
    for (int64_t c = 0; c < d; c += kLanes)
      store(s + c, load(hp + r * h.stride(0) + c) + load(dp + r * delta.stride(0) + c));
    scale_row(s, inv_rms(s, d, static_cast<float>(eps)), wp, d, op + r * d);
  }
  return {sum, out};
}

// x [T, n, d] (heads contiguous, rows may be strided); per head y = w * x / rms(x), then rotary:
// y * cos + rotate_half(y) * sin with rotate_half(y) = (-y[d/2:], y[:d/2]); cos, sin [T, d]. -> [T, n, d]
at::Tensor norm_rope(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& cos,
                     const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "norm_rope: float32");
  const int64_t T = x.size(0), n = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == d && w.numel() == d && w.is_contiguous() &&
                  half % kLanes == 0 && cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == T &&
                  cos.size(1) == d && sin.sizes() == cos.sizes(),
              "norm_rope: x [T, n, d] with contiguous heads, d % 32 == 0, cos/sin [T, d]");
  at::Tensor out = at::empty({T, n, d}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t t = 0; t < T; ++t) {
    const float *ct = cp + t * d, *st = snp + t * d;
    for (int64_t h = 0; h < n; ++h) {
      const float* xr = xp + t * x.stride(0) + h * d;
      float* o = op + (t * n + h) * d;
      const float r = inv_rms(xr, d, e);
      for (int64_t c = 0; c < half; c += kLanes) {
        const vf a = load(wp + c) * (load(xr + c) * r);                // y[c]
        const vf b = load(wp + half + c) * (load(xr + half + c) * r);  // y[c + d/2]
        store(o + c, a * load(ct + c) - b * load(st + c));
        store(o + half + c, b * load(ct + half + c) + a * load(st + half + c));
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepsplit, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("norm_rope(Tensor x, Tensor w, float eps, Tensor cos, Tensor sin) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
  m.impl("norm_rope", c10::DispatchKey::CPU, &norm_rope);
}
