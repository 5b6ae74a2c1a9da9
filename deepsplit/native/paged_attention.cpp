// Decode attention straight from the paged KV cache: one query token per sequence, keys and values
// read once where they lie in the cache blocks (no gathered copy), exact softmax in fp32 (on AVX2
// for small heads an online one, see attend_rows). The loops are laid out per register file:
// AVX-512 (16 lanes, 32 registers) or AVX2 (8 lanes, 16).
// Registered as torch.ops.deepsplit.paged_decode_attention; built and loaded by deepsplit/native.
#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using namespace deepsplit;

// run(std::integral_constant<int, NV>{}) with NV = d / kLanes, d one of 16, 32, 64, 128, 256 (checked)
template <class F>
void by_head_dim(int64_t d, F&& run) {
  switch (d) {
    case 16: run(std::integral_constant<int, 16 / kLanes>{}); break;
    case 32: run(std::integral_constant<int, 32 / kLanes>{}); break;
    case 64: run(std::integral_constant<int, 64 / kLanes>{}); break;
    case 128: run(std::integral_constant<int, 128 / kLanes>{}); break;
    default: run(std::integral_constant<int, 256 / kLanes>{});
  }
}

// scratch floats of one task: scores of nq query heads x L keys (rows rounded up to kLanes)
int64_t scratch_floats(int64_t nq, int64_t L) { return nq * ((L + kLanes - 1) / kLanes * kLanes); }

// scores s [nq, Lp] (the first L of each row set) -> softmax numerators exp(s - max) in place, zero
// past L; inv[qh] = 1 / their sum
inline void softmax_numerators(float* s, int64_t Lp, int64_t L, int64_t nq, float* inv) {
  for (int64_t qh = 0; qh < nq; ++qh) {
    float* sr = s + qh * Lp;
    for (int64_t j = L; j < Lp; ++j) sr[j] = -1e30f;
    vf m = load(sr);
    for (int64_t j = kLanes; j < Lp; j += kLanes) {
      m = vmax(load(sr + j), m);
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
}

#if DEEPSPLIT_LANES == 16  // AVX-512

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
  float inv[256];
  softmax_numerators(s, Lp, L, nq, inv);
  // o_qh = sum_j p_qh,j v_j / sum_j p_qh,j
  int64_t qh = 0;
  for (; qh + QH <= nq; qh += QH) weigh_values<NV, QH>(s, Lp, vc, rows, L, off, qh, o);
  for (; qh < nq; ++qh) weigh_values<NV, 1>(s, Lp, vc, rows, L, off, qh, o);
  for (qh = 0; qh < nq; ++qh)
    for (int c = 0; c < NV; ++c) store(o + qh * D + c * kLanes, load(o + qh * D + c * kLanes) * inv[qh]);
}

#else  // AVX2: 8 lanes, 16 registers

// The loops above hold 16 vectors in registers (16 tokens' dot products, 16 value accumulators):
// all of AVX2's. Here a key tile is kLanes tokens scored column by column (kLanes independent sums
// per query head); values are weighed one 16-token tile at a time, every query head's pass over a
// tile while its rows are in L1, a pass's kAccumulators vectors reloaded from o between tiles. Rows
// are prefetched kAhead tokens ahead, spread over the passes (a burst of whole rows per tile
// stalled the core: keys read ~25% slower).
constexpr int64_t kAhead = 16;
constexpr int kAccumulators = 8;
constexpr int64_t kValueTile = 16;

// scores s[t] = q . k_t of the kLanes tokens whose keys (for q's KV head) are at k[t]
template <int NV>
inline void score_tile(const float* q, const float* const* k, float* s) {
  vf prod[kLanes] = {};
  for (int c = 0; c < NV; ++c) {
    const vf qc = load(q + c * kLanes);
    for (int t = 0; t < kLanes; ++t) prod[t] += qc * load(k[t] + c * kLanes);
  }
  store(s, transpose_sum(prod));
}

// o[qh] (+)= sum_{j0 <= j < j1} p[qh, j] v_j for the QH query heads qh0.., columns
// [c0, c0 + NC) * kLanes of their head (accumulators in registers; o read first unless j0 == 0),
// v_j of query head qh at vc + rows[j] + voff[qh]; p rows Lp apart.
template <int NV, int NC, int QH>
void weigh_values(const float* p, int64_t Lp, const float* vc, const int64_t* rows, int64_t j0, int64_t j1,
                  int64_t L, const int64_t* voff, int64_t qh0, int c0, float* o) {
  constexpr int D = NV * kLanes;
  vf acc[QH][NC] = {};
  if (j0 > 0)
    for (int i = 0; i < QH; ++i)
      for (int c = 0; c < NC; ++c) acc[i][c] = load(o + (qh0 + i) * D + (c0 + c) * kLanes);
  for (int64_t j = j0; j < j1; ++j) {
    const float* row = vc + rows[j] + c0 * kLanes;
    if (j + kAhead < L)
      for (int i = 0; i < QH; ++i) prefetch(vc + rows[j + kAhead] + voff[qh0 + i] + c0 * kLanes, NC * kLanes);
    for (int i = 0; i < QH; ++i) {
      const vf pj = splat(p[(qh0 + i) * Lp + j]);
      const float* v = row + voff[qh0 + i];
      for (int c = 0; c < NC; ++c) acc[i][c] += pj * load(v + c * kLanes);
    }
  }
  for (int i = 0; i < QH; ++i)
    for (int c = 0; c < NC; ++c) store(o + (qh0 + i) * D + (c0 + c) * kLanes, acc[i][c]);
}

// One sequence, KV heads [h0, h0 + nhk): query heads q [nq = nhk * rep, D = NV * kLanes] (pre-scaled,
// head h's rep queries together) attend to the L keys whose rows start at kc + rows[j] (values at
// vc + rows[j]; a row holds every KV head); writes o [nq, D]. Tiles are read in token order.
// s: scratch_floats(nq, L).
template <int NV>
void attend(const float* q, int64_t nhk, int64_t rep, const float* kc, const float* vc, const int64_t* rows,
            int64_t L, float* s, float* o) {
  constexpr int D = NV * kLanes;
  constexpr int NC = std::min(NV, kAccumulators), QH = kAccumulators / NC;  // per pass over the values
  const int64_t nq = nhk * rep, Lp = (L + kLanes - 1) / kLanes * kLanes;
  int64_t off[256];  // query head -> its KV head's offset in a row
  for (int64_t qh = 0; qh < nq; ++qh) off[qh] = qh / rep * D;
  // scores s[qh * Lp + j] = q_qh . k_j, kLanes tokens at a time (past L: token L - 1 again)
  for (int64_t j0 = 0; j0 < L; j0 += kLanes) {
    const int64_t ahead = j0 + kAhead, ahead_end = std::min(L, ahead + kLanes);
    for (int64_t qh = 0; qh < nq; ++qh) {
      for (int64_t j = ahead + qh * kLanes / nq; j < std::min(ahead_end, ahead + (qh + 1) * kLanes / nq); ++j)
        prefetch(kc + rows[j], nhk * D);
      const float* k[kLanes];
      for (int t = 0; t < kLanes; ++t) k[t] = kc + rows[std::min(j0 + t, L - 1)] + off[qh];
      score_tile<NV>(q + qh * D, k, s + qh * Lp + j0);
    }
  }
  float inv[256];
  softmax_numerators(s, Lp, L, nq, inv);
  // o_qh = sum_j p_qh,j v_j / sum_j p_qh,j
  for (int64_t j0 = 0; j0 < L; j0 += kValueTile) {
    const int64_t j1 = std::min(L, j0 + kValueTile);
    for (int c0 = 0; c0 < NV; c0 += NC) {
      int64_t qh = 0;
      for (; qh + QH <= nq; qh += QH) weigh_values<NV, NC, QH>(s, Lp, vc, rows, j0, j1, L, off, qh, c0, o);
      for (; qh < nq; ++qh) weigh_values<NV, NC, 1>(s, Lp, vc, rows, j0, j1, L, off, qh, c0, o);
    }
  }
  for (int64_t qh = 0; qh < nq; ++qh)
    for (int c = 0; c < NV; ++c) store(o + qh * D + c * kLanes, load(o + qh * D + c * kLanes) * inv[qh]);
}

// Row order, for small heads (rep <= kRowsMaxRep query heads per KV head, nh * d <= kRowsMaxFloats:
// the small checkpoint's 8 x 64 with 4 KV heads). The loops above read a tile column by column (a
// KV head's slice of 8-16 rows, then the next head's); on this Zen 3 host (2 cores, ~12 GB/s per
// core) such an order streams from memory ~1.5x slower than a plain read on one core, and the
// kernel took read + compute (7.7-8.6 ms vs 5.4-6.0 for 8 layers at the serving shape). Here a
// sequence is read token by token: key row j, then value row j, each front to back, rows
// kRowsAhead tokens ahead prefetched whole; that streams at the speed of a plain read (K and V
// rows interleaved even slightly faster) with the compute hidden. The query heads are the lanes: a
// key row gives the scores of kLanes heads at once (one transpose_sum), so the softmax is online
// and lane-wise: a running max m per head, rescaled lazily (o and l only when a score passes m by
// more than kRescaleAbove, so p = exp(s - m) <= e^8). The accumulators o [nq, D] stay in L1; with
// more heads, longer rows or more heads per KV head (more work per byte) the loops above are faster.
constexpr int64_t kRowsMaxRep = 2, kRowsMaxFloats = 512;
constexpr int64_t kRowsAhead = 4;
constexpr float kRescaleAbove = 8.0f;

inline vf bcast(const float* p) { return _mm256_broadcast_ss(p); }

// scores of query heads g*kLanes .. g*kLanes + 7 (the lanes) against the key row kr. R > 0: R = rep
// (1 or 2) and nq a multiple of kLanes, head i reads KV head (g*kLanes + i) / R (fixed offsets, each
// key vector loaded once for its R heads); R == 0: head i reads kr + off[i].
template <int NV, int R>
inline vf score_heads(const float* q, int64_t g, int64_t rep, const int64_t* off, const float* kr) {
  constexpr int D = NV * kLanes;
  const float* qg = q + g * kLanes * D;
  vf prod[kLanes] = {};
  if constexpr (R > 0) {
    const float* kg = kr + (g * kLanes / rep) * D;
    for (int h = 0; h < kLanes / R; ++h)
      for (int c = 0; c < NV; ++c) {
        const vf k = load(kg + h * D + c * kLanes);
        for (int r = 0; r < R; ++r) prod[h * R + r] += load(qg + (h * R + r) * D + c * kLanes) * k;
      }
  } else {
    for (int i = 0; i < kLanes; ++i) {
      const float *qi = qg + i * D, *ki = kr + off[g * kLanes + i];
      vf a = load(qi) * load(ki);
      for (int c = 1; c < NV; ++c) a += load(qi + c * kLanes) * load(ki + c * kLanes);
      prod[i] = a;
    }
  }
  return transpose_sum(prod);
}

// The L keys of one sequence (or of a chunk of it) whose cache rows start at rows[j] (in floats; a
// row holds the nkv KV heads): query heads q [G * kLanes, D] (pre-scaled, zero past nq = nkv * rep),
// off[qh] = the offset of head qh's KV head in a row (0 past nq). Writes o [nq, D] = sum_j p_j v_j, m [G * kLanes]
// (the max used) and l = sum_j p_j, p_j = exp(s_j - m): o / l is the attention over those keys.
template <int NV, int R>
void attend_rows(const float* q, int64_t nkv, int64_t rep, int64_t G, const int64_t* off, const float* kc,
                 const float* vc, const int64_t* rows, int64_t L, float* o, float* m, float* l) {
  constexpr int D = NV * kLanes;
  const int64_t nq = nkv * rep, rowf = nkv * D;
  alignas(32) float p[256], al[kLanes];
  for (int64_t i = 0; i < nq * D; ++i) o[i] = 0.f;
  for (int64_t g = 0; g < G; ++g) store(l + g * kLanes, vf{});
  const vf above = splat(kRescaleAbove);
  for (int64_t j = 0; j < L; ++j) {
    if (j + kRowsAhead < L) {
      prefetch(kc + rows[j + kRowsAhead], rowf);
      prefetch(vc + rows[j + kRowsAhead], rowf);
    }
    const float* kr = kc + rows[j];
    for (int64_t g = 0; g < G; ++g) {
      const vf s = score_heads<NV, R>(q, g, rep, off, kr);
      if (j == 0) store(m + g * kLanes, s);
      vf mg = load(m + g * kLanes);
      if (__builtin_expect(_mm256_movemask_ps(s > mg + above) != 0, 0)) {  // new max: rescale
        const vf mn = vmax(mg, s), a = vexp(mg - mn);
        store(l + g * kLanes, load(l + g * kLanes) * a);
        store(al, a);
        for (int64_t i = 0; i < kLanes && g * kLanes + i < nq; ++i) {
          const vf ai = bcast(al + i);
          float* oi = o + (g * kLanes + i) * D;
          for (int c = 0; c < NV; ++c) store(oi + c * kLanes, load(oi + c * kLanes) * ai);
        }
        store(m + g * kLanes, mn);
        mg = mn;
      }
      const vf e = vexp(s - mg);
      store(l + g * kLanes, load(l + g * kLanes) + e);
      store(p + g * kLanes, e);
    }
    // o_qh += p_qh v_j, head by head (the value row read front to back; loading a KV head's slice
    // into registers first for its rep heads was ~20% slower from memory)
    const float* vr = vc + rows[j];
    for (int64_t qh = 0; qh < nq; ++qh) {
      const vf pq = bcast(p + qh);
      const float* v = vr + off[qh];
      float* oq = o + qh * D;
      for (int c = 0; c < NV; ++c) store(oq + c * kLanes, load(oq + c * kLanes) + pq * load(v + c * kLanes));
    }
  }
}

// with few sequences, a sequence's keys are split into chunks of at least this many
constexpr int64_t kMinChunk = 16;

#endif

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
  TORCH_CHECK(k_cache.size(3) == d && nh % nkv == 0 && nh <= 256 && d >= 16 && d <= 256 &&
                  (d & (d - 1)) == 0 && out.numel() == q.numel(),
              "paged_decode_attention: shapes (head_dim 16, 32, 64, 128 or 256)");
  const int64_t rep = nh / nkv, width = block_tables.size(1), n = seqs.numel();
  TORCH_CHECK(rows.numel() == n && lens.numel() == n, "paged_decode_attention: seqs, rows, lens of one length");
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* sp = seqs.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t nblocks = k_cache.size(0), nrows = block_tables.size(0), T = q.size(0);
  for (int64_t i = 0; i < n; ++i) {  // every key the kernel will read lies in the cache
    const int64_t L = lp[i], s = sp[i];
    TORCH_CHECK(L >= 1 && (L + bs - 1) / bs <= width && s >= 0 && s < nrows && rp[i] >= 0 && rp[i] < T,
                "paged_decode_attention: sequence ", i, " out of range");
    for (int64_t b = 0; b < (L + bs - 1) / bs; ++b) {
      const int64_t blk = bt[s * width + b];
      TORCH_CHECK(blk >= 0 && blk < nblocks, "paged_decode_attention: block id out of range");
    }
  }
  const float sc = static_cast<float>(scale);
#if DEEPSPLIT_LANES == 8
  if (rep <= kRowsMaxRep && nh * d <= kRowsMaxFloats) {
    // A task is a range of one sequence's keys with all KV heads (whole rows read in order). With
    // fewer than 4 sequences per thread a sequence's keys are split into up to that many chunks of
    // >= kMinChunk keys (a multiple of the threads where there are as many: static partition),
    // merged below; splitting by KV head instead would read each row in slices.
    const int64_t nt = at::get_num_threads(), want = n >= 4 * nt ? 1 : (4 * nt + n - 1) / n;
    std::vector<int64_t> first(n + 1, 0);  // sequence i: tasks [first[i], first[i + 1])
    for (int64_t i = 0; i < n; ++i) {
      const int64_t S = std::max<int64_t>(1, std::min<int64_t>(want, lp[i] / kMinChunk));
      first[i + 1] = first[i] + (S >= nt ? S - S % nt : S);
    }
    const int64_t tasks = first[n], G = (nh + kLanes - 1) / kLanes, np = G * kLanes;
    const bool split = tasks > n;
    const int64_t stride = nh * d + 2 * np;  // a chunk's o [nh, d], m [np], l [np] (when split)
    std::unique_ptr<float[]> part(split ? new float[tasks * stride] : nullptr);
    const int R = nh % kLanes ? 0 : static_cast<int>(rep);  // score_heads' fixed offsets: whole groups
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qs(np * d, 0.f);  // zero past nh
      std::vector<int64_t> off(np, 0), rows;
      alignas(32) float mb[256], lb[256];
      for (int64_t qh = 0; qh < nh; ++qh) off[qh] = qh / rep * d;
      int64_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
      for (int64_t t = begin; t < end; ++t) {
        while (first[i + 1] <= t) ++i;
        const int64_t S = first[i + 1] - first[i], c = t - first[i], L = lp[i];
        const int64_t j0 = c * L / S, j1 = (c + 1) * L / S;
        for (int64_t x = 0; x < nh * d; ++x) qs[x] = qp[rp[i] * nh * d + x] * sc;
        rows.resize(j1 - j0);  // cache row of each key, in floats (block by block: no divisions)
        const int64_t* table = bt + sp[i] * width;
        for (int64_t j = j0, b = j0 / bs, u = j0 % bs; j < j1; ++j) {
          rows[j - j0] = (table[b] * bs + u) * nkv * d;
          if (++u == bs) u = 0, ++b;
        }
        float* o = split ? part.get() + t * stride : op + rp[i] * nh * d;
        float *m = split ? o + nh * d : mb, *l = split ? o + nh * d + np : lb;
        auto run = [&](auto nv) {
          constexpr int NV = decltype(nv)::value;
          auto f = R == 1 ? attend_rows<NV, 1> : R == 2 ? attend_rows<NV, 2> : attend_rows<NV, 0>;
          f(qs.data(), nkv, rep, G, off.data(), kp, vp, rows.data(), j1 - j0, o, m, l);
        };
        by_head_dim(d, run);
        if (!split)
          for (int64_t qh = 0; qh < nh; ++qh) {
            const vf inv = splat(1.0f / l[qh]);
            for (int64_t x = 0; x < d; x += kLanes) store(o + qh * d + x, load(o + qh * d + x) * inv);
          }
      }
    });
    if (split)  // out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c, M = max_c m_c (few sequences: here)
      for (int64_t i = 0; i < n; ++i) {
        const float* p0 = part.get() + first[i] * stride;
        const int64_t S = first[i + 1] - first[i];
        float* oi = op + rp[i] * nh * d;
        for (int64_t qh = 0; qh < nh; ++qh) {
          const float* m0 = p0 + nh * d + qh;  // chunk c: m at m0[c * stride], l at m0[c * stride + np]
          float M = m0[0], den = 0.f;
          for (int64_t c = 1; c < S; ++c) M = std::max(M, m0[c * stride]);
          for (int64_t c = 0; c < S; ++c) den += std::exp(m0[c * stride] - M) * m0[c * stride + np];
          for (int64_t x = 0; x < d; x += kLanes) store(oi + qh * d + x, vf{});
          for (int64_t c = 0; c < S; ++c) {
            const vf w = splat(std::exp(m0[c * stride] - M) / den);
            const float* oc = p0 + c * stride + qh * d;
            for (int64_t x = 0; x < d; x += kLanes) store(oi + qh * d + x, load(oi + qh * d + x) + w * load(oc + x));
          }
        }
      }
    return;
  }
#endif
  // a task is one sequence with all its KV heads (whole cache rows read in order); with few
  // sequences, one KV head each so that every thread has work
  const int64_t groups = n >= 4 * at::get_num_threads() ? 1 : nkv, nhk = nkv / groups;
  at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(nhk * rep * d), s;
    std::vector<int64_t> rows;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / groups, h0 = (t % groups) * nhk, L = lp[i], row = rp[i];
      const int64_t off = (row * nh + h0 * rep) * d;
      for (int64_t c = 0; c < nhk * rep * d; ++c) qs[c] = qp[off + c] * sc;
      s.resize(scratch_floats(nhk * rep, L));
      rows.resize(L);  // cache row of each key, in floats (block by block: no divisions)
      const int64_t* table = bt + sp[i] * width;
      for (int64_t j = 0, b = 0; j < L; ++b)
        for (int64_t u = 0; u < bs && j < L; ++u, ++j) rows[j] = (table[b] * bs + u) * nkv * d;
      const float *kc = kp + h0 * d, *vc = vp + h0 * d;
      auto run = [&](auto nv) {
        attend<decltype(nv)::value>(qs.data(), nhk, rep, kc, vc, rows.data(), L, s.data(), op + off);
      };
      by_head_dim(d, run);
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
