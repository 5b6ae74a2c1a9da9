// The routed experts of one MoE layer for few rows per expert (decode): every expert's weights are
// streamed once in their checkpoint layout, rows read in place, gate/up -> SiLU * up -> down fused,
// experts split across threads; and the router's softmax/top-k.
// Registered as torch.ops.deepsplit.{moe_experts, moe_route, moe_route_x}.
#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using namespace deepsplit;

constexpr int64_t kRowGroup = 8;  // output rows per pass over a weight: [8, N] floats stay in L1

// out_m = x_m @ W for the n rows x_m (K floats each, at xs[m]; out_m: N floats at outs[m]); W [K, N]
// with rows ldw floats apart, N % 16 == 0. k runs outermost (4
// weight rows at a time, the next 4 prefetched), so W is read as one stream per group of 8 rows;
// each output sums k in order 0..K-1.
void rows_times_weight(const float* const* xs, float* const* outs, int64_t n, const float* W, int64_t ldw,
                       int64_t K, int64_t N) {
  const int64_t nv = N / kLanes;
  for (int64_t g = 0; g < n; g += kRowGroup) {
    const int64_t gn = std::min(kRowGroup, n - g);
    const float* const* x = xs + g;
    float* const* o = outs + g;
    for (int64_t m = 0; m < gn; ++m) std::fill(o[m], o[m] + N, 0.0f);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float* w = W + k * ldw;
      for (int64_t c = 0; c < nv; ++c) {
        const vf w0 = load(w + c * kLanes), w1 = load(w + ldw + c * kLanes);
        const vf w2 = load(w + 2 * ldw + c * kLanes), w3 = load(w + 3 * ldw + c * kLanes);
        for (int r = 4; r < 8; ++r) __builtin_prefetch(w + r * ldw + c * kLanes);
        for (int64_t m = 0; m < gn; ++m) {
          const float* xm = x[m] + k;
          float* om = o[m] + c * kLanes;
          store(om, load(om) + xm[0] * w0 + xm[1] * w1 + xm[2] * w2 + xm[3] * w3);
        }
      }
    }
    for (; k < K; ++k) {
      const float* w = W + k * ldw;
      for (int64_t c = 0; c < nv; ++c) {
        const vf w0 = load(w + c * kLanes);
        for (int64_t m = 0; m < gn; ++m) {
          float* om = o[m] + c * kLanes;
          store(om, load(om) + x[m][k] * w0);
        }
      }
    }
  }
}

// x [T, H]; ids, weights [T, k] (expert and routing weight of each token's k assignments);
// gate_up [E, H, 2I] (gate columns, then up); down [E, I, H]  ->  [T, H] = sum_j w_tj * expert_tj(x_t).
// gemm_only (for timing the weight GEMMs alone): no SiLU, no weighted sum; returns [T * k, H].
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down, bool gemm_only) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat &&
                  gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat &&
                  ids.scalar_type() == at::kLong,
              "moe_experts: float32 tensors and int64 ids");
  TORCH_CHECK(x.is_contiguous() && ids.is_contiguous() && weights.is_contiguous() && gate_up.is_contiguous() &&
                  down.is_contiguous(),
              "moe_experts: contiguous inputs");
  const int64_t T = x.size(0), H = x.size(1), topk = ids.size(1), E = gate_up.size(0), I = down.size(1);
  TORCH_CHECK(gate_up.size(1) == H && gate_up.size(2) == 2 * I && down.size(2) == H && H % kLanes == 0 &&
                  I % kLanes == 0 && weights.sizes() == ids.sizes() && ids.size(0) == T,
              "moe_experts: shapes");
  const int64_t* idp = ids.data_ptr<int64_t>();
  // assignments a = t * topk + j grouped by expert (counting sort, stable)
  std::vector<int64_t> start(E + 1, 0), order(T * topk);
  for (int64_t a = 0; a < T * topk; ++a) {
    TORCH_CHECK(idp[a] >= 0 && idp[a] < E, "moe_experts: expert id out of range");
    ++start[idp[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < T * topk; ++a) order[fill[idp[a]]++] = a;
  }
  std::vector<int64_t> touched;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) touched.push_back(e);
  at::Tensor ys = at::empty({T * topk, H}, x.options());  // expert output of each assignment
  const float* xp = x.data_ptr<float>();
  const float* gup = gate_up.data_ptr<float>();
  const float* dp = down.data_ptr<float>();
  float* yp = ys.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(touched.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> in;
    std::vector<float*> hrows, yrows;
    std::vector<float> h;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = touched[i], a0 = start[e], n = start[e + 1] - a0;
      in.resize(n), hrows.resize(n), yrows.resize(n), h.resize(n * 2 * I);
      for (int64_t m = 0; m < n; ++m) {
        in[m] = xp + order[a0 + m] / topk * H;  // the assignment's token row
        hrows[m] = h.data() + m * 2 * I;
        yrows[m] = yp + order[a0 + m] * H;
      }
      rows_times_weight(in.data(), hrows.data(), n, gup + e * H * 2 * I, 2 * I, H, 2 * I);  // [n, 2I]
      for (int64_t m = 0; m < n; ++m) {  // act = silu(gate) * up, into the gate half
        float* hm = hrows[m];
        for (int64_t c = 0; c < I && !gemm_only; c += kLanes) {
          const vf g = load(hm + c);
          store(hm + c, g / (1.0f + vexp(-g)) * load(hm + I + c));
        }
        in[m] = hm;
      }
      rows_times_weight(in.data(), yrows.data(), n, dp + e * I * H, H, I, H);  // [n, H]
    }
  });
  if (gemm_only) return ys;
  at::Tensor out = at::empty({T, H}, x.options());
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < H; c += kLanes) {
        vf acc = vf{};
        for (int64_t j = 0; j < topk; ++j) acc += wp[t * topk + j] * load(yp + (t * topk + j) * H + c);
        store(op + t * H + c, acc);
      }
  });
  return out;
}

// softmax over one token's E router logits l, the k most probable experts (the lower id first on
// ties) into ids, their probabilities renormalised to sum to 1 into w; p: scratch of E floats.
void route_row(const float* l, int64_t E, int64_t k, float* p, float* w, int64_t* ids) {
  const float m = *std::max_element(l, l + E);
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - m));
  for (int64_t e = 0; e < E; ++e) p[e] /= sum;
  float top = 0.f;
  for (int64_t j = 0; j < k; ++j) {  // k small: selection by repeated scans
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= ids[i] == e;
      if (!taken && (best < 0 || p[e] > p[best])) best = e;
    }
    ids[j] = best, w[j] = p[best];
    top += p[best];
  }
  for (int64_t j = 0; j < k; ++j) w[j] /= top;
}

// router logits [T, E] -> (weights [T, k] float, ids [T, k] long), as route_row per token.
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(),
              "moe_route: contiguous float32 logits [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k > 0 && k <= E, "moe_route: 0 < k <= E");
  at::Tensor w = at::empty({T, k}, logits.options()), ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<float> p(E);
  for (int64_t t = 0; t < T; ++t) route_row(lp + t * E, E, k, p.data(), wp + t * k, ip + t * k);
  return {w, ids};
}

// The router whole: x [T, H] and its weight gate [E, H] (nn.Linear layout) -> moe_route(x @ gate^T, k)
// in one call (the [T, E] logits never leave the thread's cache). Each logit is a dot product of H
// floats summed lane-wise, then across lanes.
std::tuple<at::Tensor, at::Tensor> moe_route_x(const at::Tensor& x, const at::Tensor& gate, int64_t k) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && gate.scalar_type() == at::kFloat && x.dim() == 2 &&
                  gate.dim() == 2 && x.is_contiguous() && gate.is_contiguous() && x.size(1) == gate.size(1) &&
                  x.size(1) % kLanes == 0,
              "moe_route_x: contiguous float32 x [T, H], gate [E, H], H % lanes == 0");
  const int64_t T = x.size(0), H = x.size(1), E = gate.size(0);
  TORCH_CHECK(k > 0 && k <= E, "moe_route_x: 0 < k <= E");
  at::Tensor w = at::empty({T, k}, x.options()), ids = at::empty({T, k}, x.options().dtype(at::kLong));
  const float *xp = x.data_ptr<float>(), *gp = gate.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> l(E), p(E);
    for (int64_t t = begin; t < end; ++t) {
      const float* xt = xp + t * H;
      for (int64_t e = 0; e < E; ++e) {
        const float* ge = gp + e * H;
        vf acc = vf{};
        for (int64_t c = 0; c < H; c += kLanes) acc += load(xt + c) * load(ge + c);
        l[e] = hsum(acc);
      }
      route_row(l.data(), E, k, p.data(), wp + t * k, ip + t * k);
    }
  });
  return {w, ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepsplit, m) {
  m.def("moe_route(Tensor logits, int k) -> (Tensor, Tensor)");
  m.impl("moe_route", c10::DispatchKey::CPU, &moe_route);
  m.def("moe_route_x(Tensor x, Tensor gate, int k) -> (Tensor, Tensor)");
  m.impl("moe_route_x", c10::DispatchKey::CPU, &moe_route_x);
  m.def(
      "moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down, bool gemm_only=False) "
      "-> Tensor");
  m.impl("moe_experts", c10::DispatchKey::CPU, &moe_experts);
}
