// Row-wise max and its first index of a [B, C] float32 matrix: the greedy token of each row of one
// lm_head vocabulary chunk while it is in cache (torch's max(dim) with indices is not vectorized
// on CPU: ~10x slower). Registered as torch.ops.deepsplit.row_max.
#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

namespace {

using namespace deepsplit;

// y [B, C] (rows contiguous) -> (max [B] float, argmax [B] long: first index holding the max)
std::tuple<at::Tensor, at::Tensor> row_max(const at::Tensor& y) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1, "row_max: [B, C] float32 rows");
  const int64_t B = y.size(0), C = y.size(1), ld = y.stride(0);
  TORCH_CHECK(C > 0, "row_max: empty rows");
  at::Tensor vals = at::empty({B}, y.options()), idx = at::empty({B}, y.options().dtype(at::kLong));
  const float* yp = y.data_ptr<float>();
  float* vp = vals.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = yp + b * ld;
      // per lane: the largest value seen and the first column holding it (one pass, no scalar scan)
      float m = row[0];
      int64_t at = 0, c = 0;
      if (C >= kLanes) {
        vf mv = load(row);
        vi iv = iota(), cur = iv;
        for (c = kLanes; c + kLanes <= C; c += kLanes) {
          cur += kLanes;
          const vf x = load(row + c);
          const vi gt = x > mv;  // -1 where the lane improves
          iv = gt ? cur : iv;
          mv = vmax(x, mv);
        }
        m = hmax(mv);
        at = C;
        for (int l = 0; l < kLanes; ++l)
          if (mv[l] == m && iv[l] < at) at = iv[l];
      }
      for (; c < C; ++c)
        if (row[c] > m) m = row[c], at = c;
      vp[b] = m, ip[b] = at;
    }
  });
  return {vals, idx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepsplit, m) {
  m.def("row_max(Tensor y) -> (Tensor, Tensor)");
  m.impl("row_max", c10::DispatchKey::CPU, &row_max);
}
