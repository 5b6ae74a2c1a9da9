// Decode attention straight from the paged KV cache: one query token per sequence, keys and values
// read once where they lie in the cache blocks (no gathered copy), exact softmax in fp32.
// Registered as torch.ops.deepsplit.paged_decode_attention; built and loaded by deepsplit/native.
#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using namespace deepsplit;

// 16 vectors -> one vector of their 16 sums (lane t = sum of v[t]), by pairwise shuffles and adds.
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

// o[qh] += sum_j p[qh, j] v_j for the QH query heads qh0.. (accumulators in registers), v_j of
// query head qh at vc + rows[j] + voff[qh]; p rows Lp apart.
template <int NV, int QH>
void weigh_values(const float* p, int64_t Lp, const float* vc, const int64_t* rows, int64_t L, const int64_t* voff,
                  int64_t qh0, float* o) {
  constexpr int D = NV * kLanes;
  vf acc[QH][NV] = {};
  for (int64_t j = 0; j < L; ++j) {
    const float* row = vc + rows[j];
    if (j + 16 < L)
      for (int i = 0; i < QH; ++i) prefetch(vc + rows[j + 16] + voff[qh0 + i], D);
    for (int i = 0; i < QH; ++i) {
      const vf pj = splat(p[(qh0 + i) * Lp + j]);
      const float* v = row + voff[qh0 + i];
      for (int c = 0; c < NV; ++c) acc[i][c] += pj * load(v + c * kLanes);
    }
  }
  for (int i = 0; i < QH; ++i)
    for (int c = 0; c < NV; ++c) store(o + (qh0 + i) * D + c * kLanes, acc[i][c]);
}

// One sequence, KV heads [h0, h0 + nhk): query heads q [nq = nhk * rep, NV * 16] (pre-scaled, head
// h's rep queries together) attend to the L keys whose rows start at kc + rows[j] (values at
// vc + rows[j]; a row holds every KV head); writes o [nq, NV * 16]. Rows are read in token order.
// s: scratch of nq * (L rounded up to 16) floats.
template <int NV>
void attend(const float* q, int64_t nhk, int64_t rep, const float* kc, const float* vc, const int64_t* rows,
            int64_t L, float* s, float* o) {
  constexpr int D = NV * kLanes, QH = 16 / NV;  // QH query heads per pass over the values
  const int64_t nq = nhk * rep, Lp = (L + kLanes - 1) / kLanes * kLanes;
  int64_t off[256];  // query head -> its KV head's offset in a row
  for (int64_t qh = 0; qh < nq; ++qh) off[qh] = qh / rep * D;
  // scores s[qh * Lp + j] = q_qh . k_j, 16 tokens at a time
  for (int64_t j0 = 0; j0 < L; j0 += kLanes) {
    const int cnt = static_cast<int>(std::min<int64_t>(kLanes, L - j0));
    for (int64_t j = j0 + kLanes; j < std::min(L, j0 + 2 * kLanes); ++j) prefetch(kc + rows[j], nhk * D);
    for (int64_t qh = 0; qh < nq; ++qh) {
      vf qv[NV], prod[kLanes];
      for (int c = 0; c < NV; ++c) qv[c] = load(q + qh * D + c * kLanes);
      for (int t = 0; t < kLanes; ++t) {
        vf a = vf{};
        if (t < cnt) {
          const float* k = kc + rows[j0 + t] + off[qh];
          for (int c = 0; c < NV; ++c) a += qv[c] * load(k + c * kLanes);
        }
        prod[t] = a;
      }
      store(s + qh * Lp + j0, transpose_sum(prod));
    }
  }
  // softmax numerators (exp(s - max)), zero past L, and 1 / their sum per query head
  float inv[256];
  for (int64_t qh = 0; qh < nq; ++qh) {
    float* sr = s + qh * Lp;
    for (int64_t j = L; j < Lp; ++j) sr[j] = -1e30f;
    vf m = load(sr);
    for (int64_t j = kLanes; j < Lp; j += kLanes) {
      const vf x = load(sr + j);
      m = x > m ? x : m;
    }
    const vf mx = splat(hmax(m));
    vf sum = vf{};
    for (int64_t j = 0; j < Lp; j += kLanes) {
      const vf e = vexp(load(sr + j) - mx);
      sum += e;
      store(sr + j, e);
    }
    inv[qh] = 1.0f / hsum(sum);
  }
  // o_qh = sum_j p_qh,j v_j / sum_j p_qh,j
  int64_t qh = 0;
  for (; qh + QH <= nq; qh += QH) weigh_values<NV, QH>(s, Lp, vc, rows, L, off, qh, o);
  for (; qh < nq; ++qh) weigh_values<NV, 1>(s, Lp, vc, rows, L, off, qh, o);
  for (qh = 0; qh < nq; ++qh)
    for (int c = 0; c < NV; ++c) store(o + qh * D + c * kLanes, load(o + qh * D + c * kLanes) * inv[qh]);
}

// q [T, nh, d]; k_cache, v_cache [blocks, bs, nkv, d]; block_tables [S, W] long; for the n decode
// sequences: seqs [n] (their block-table row), rows [n] (their query row of q/out), lens [n] (keys,
// the new one included, already written to the cache). out [T, nh, d]: rows `rows` are written.
void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seqs, const at::Tensor& rows,
                            const at::Tensor& lens, double scale, at::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.is_contiguous() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && out.is_contiguous() && block_tables.is_contiguous(),
              "paged_decode_attention: contiguous q [T, nh, d] and caches [blocks, bs, nkv, d]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seqs.scalar_type() == at::kLong &&
                  rows.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "paged_decode_attention: index tensors must be int64");
  const int64_t nh = q.size(1), d = q.size(2), bs = k_cache.size(1), nkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && nh % nkv == 0 && nh <= 256 && d % kLanes == 0 && d <= 256 &&
                  (d & (d - 1)) == 0 && out.numel() == q.numel(),
              "paged_decode_attention: shapes (head_dim 16, 32, 64, 128 or 256)");
  const int64_t rep = nh / nkv, width = block_tables.size(1), n = seqs.numel();
  TORCH_CHECK(rows.numel() == n && lens.numel() == n, "paged_decode_attention: seqs, rows, lens of one length");
  for (int64_t i = 0; i < n; ++i) {  // every key the kernel will read lies in the cache
    const int64_t L = lens.data_ptr<int64_t>()[i], s = seqs.data_ptr<int64_t>()[i];
    TORCH_CHECK(L >= 1 && (L + bs - 1) / bs <= width && s >= 0 && s < block_tables.size(0) &&
                    rows.data_ptr<int64_t>()[i] >= 0 && rows.data_ptr<int64_t>()[i] < q.size(0),
                "paged_decode_attention: sequence ", i, " out of range");
    for (int64_t b = 0; b < (L + bs - 1) / bs; ++b) {
      const int64_t blk = block_tables.data_ptr<int64_t>()[s * width + b];
      TORCH_CHECK(blk >= 0 && blk < k_cache.size(0), "paged_decode_attention: block id out of range");
    }
  }
  // a task is one sequence with all its KV heads (whole cache rows read in order); with few
  // sequences, one KV head each so that every thread has work
  const int64_t groups = n >= 4 * at::get_num_threads() ? 1 : nkv, nhk = nkv / groups;
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* sp = seqs.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(nhk * rep * d), s;
    std::vector<int64_t> rows;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / groups, h0 = (t % groups) * nhk, L = lp[i], row = rp[i];
      const int64_t off = (row * nh + h0 * rep) * d;
      for (int64_t c = 0; c < nhk * rep * d; ++c) qs[c] = qp[off + c] * sc;
      s.resize(nhk * rep * ((L + kLanes - 1) / kLanes * kLanes));
      rows.resize(L);  // cache row of each key, in floats (block by block: no divisions)
      const int64_t* table = bt + sp[i] * width;
      for (int64_t j = 0, b = 0; j < L; ++b)
        for (int64_t u = 0; u < bs && j < L; ++u, ++j) rows[j] = (table[b] * bs + u) * nkv * d;
      const float *kc = kp + h0 * d, *vc = vp + h0 * d;
      auto run = [&](auto nv) {
        attend<decltype(nv)::value>(qs.data(), nhk, rep, kc, vc, rows.data(), L, s.data(), op + off);
      };
      switch (d / kLanes) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 8: run(std::integral_constant<int, 8>{}); break;
        default: run(std::integral_constant<int, 16>{});
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepsplit, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqs, "
      "Tensor rows, Tensor lens, float scale, Tensor(a!) out) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &paged_decode_attention);
}
