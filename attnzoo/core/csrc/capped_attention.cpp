// Flash-style CPU attention with a soft cap on the scores (attnzoo.core.capped; docs/architecture.md).
//
// out, lse = attention of q (X, Y, Lq, D) over k, v (X, Y, Lk, D|Dv) where the score of query i and key j is
//   x = scale * q_i . k_j + mask[i, j]          (mask: optional additive, -inf hides a key)
//   x = cap * tanh(x / cap)                      (when cap > 0; a hidden key stays hidden)
// and, with `causal`, key j is visible to query i only when j <= i + offset. With `idx` (X, Y, Lk) int64, key j
// of (x, y) is row idx[x, y, j] of k and v (a selection read in place: with up to kDirectRows query rows row by
// row, else each block of keys copied into a worker's scratch rows for its GEMMs; no gathered copy of the
// selection in memory; not with `causal`).
// Work items are (x, y, block of query rows), run in parallel; each walks blocks of keys: one GEMM for the
// scores, one pass (mask + cap + row maximum), one pass (exp + row sum, online rescale), one GEMM into the
// output. Rows of every tensor need a unit last stride; every other stride is free (expanded heads,
// overlapping windows). GEMMs are BLAS sgemm_/dgemm_, which libtorch_cpu exports (MKL).
// With a skipped range [skip_at, skip_at + skip) (not with `idx` or `causal`), key j is row j of k and v below
// skip_at and row j + skip from there: a decode step over sinks + window (rows [0, s) and [e, n)) in one call.
//
// quest_attention: a quest decode step in one call per (batch, KV head): each page's upper bound of q . k from its
// channel-wise key min/max (float32 or bfloat16, widened exactly), the best units kept, and the sinks, the selected
// units and the local window read in place through the same loop (attnzoo.cache.select.Quest).
// tokenselect_attention: tokenselect's page-first step per batch row: a soft vote over the pages' bounds, exact
// token scores only in the best pages, a soft vote over those tokens, the best tokens read in place by every head.
// peak: max |t| of an attention input, NaN when any element is NaN (attnzoo.checks' finiteness scan; also
// append_rows' scan of the appended rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "flash_common.h"

namespace {

using attnzoo_flash::fast_exp;
using attnzoo_flash::finish_row;
using attnzoo_flash::gemm;
using attnzoo_flash::operand_strides;
using attnzoo_flash::softmax_step;

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

template <typename T>
struct Args {
  const T *q, *k, *v, *mask;
  T* out;
  T* lse;
  int64_t X, Y, Lq, Lk, D, Dv;
  int64_t qs[3], ks[3], vs[3], ms[4], os[3];  // strides (x, y, row) and the mask's (x, y, i, j)
  int64_t k_col;  // > 0: k is laid out transposed (unit stride along keys, this stride along D)
  const int64_t* idx;  // nullptr, or the rows of k and v each (x, y) reads (strides is)
  int64_t is[2];
  int64_t skip_at, skip;  // keys j >= skip_at read row j + skip (skip = 0: none)
  const T* pre;  // nullptr, or the scores q . k already known (rows of pre_ld, one per query row; with idx)
  int64_t pre_ld;
  T scale, cap;
  bool causal;
  int64_t offset;
};

// one row's logits in place: scale * s + mask (-inf hides), with CAP the capped logit minus its bound
// (cap * tanh(x / cap) - cap = -2 cap / (exp(2x / cap) + 1)); returns the row maximum. One vectorised pass.
template <typename T, bool CAP, int MASK>
inline T logits_pass(T* sr, const T* mr, int64_t mstride, int64_t vis, T scale, T two_over_cap, T minus_two_cap) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T mx = ninf;
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < vis; ++c) {
    T x = sr[c] * scale;
    if (MASK == 1) x += mr[c];
    if (MASK == 2) x += mr[c * mstride];
    if (CAP) {
      const T z = minus_two_cap / (fast_exp(x * two_over_cap) + T(1));
      x = x == ninf ? ninf : z;
    }
    sr[c] = x;
    mx = x > mx ? x : mx;
  }
  return mx;
}

template <typename T, bool CAP>
inline T logits(T* sr, const T* mr, int64_t mstride, int64_t vis, T scale, T two_over_cap, T minus_two_cap) {
  if (!mr) return logits_pass<T, CAP, 0>(sr, mr, mstride, vis, scale, two_over_cap, minus_two_cap);
  if (mstride == 1) return logits_pass<T, CAP, 1>(sr, mr, mstride, vis, scale, two_over_cap, minus_two_cap);
  return logits_pass<T, CAP, 2>(sr, mr, mstride, vis, scale, two_over_cap, minus_two_cap);
}

// query rows up to which selected keys are read row by row in place (dot products and axpys); above, the
// selected rows are copied into scratch rows for GEMMs. A decode step's rows are one KV head's query heads:
// with a few of them, a GEMM's packing and call cost more than the arithmetic, and the copy is a second pass
// over every selected row (measured: a quest step's read 1.5x faster in place, SmolLM2's 3 rows, D=64)
constexpr int64_t kDirectRows = 8;
// selected rows prefetched ahead (they are scattered: a page boundary stops the hardware prefetcher)
constexpr int64_t kAhead = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t len) {
  for (int64_t d = 0; d < len; d += 64 / sizeof(T)) __builtin_prefetch(row + d);
}

// s[r * lds + c] = q_r . k_{idx[c]} for the query rows r < rows of q (row stride qrow) and the rows idx[0, n) of k
// (row stride ldk). rows <= kDirectRows: read in place; else copied into kbuf (kBlockK x D) for one GEMM per
// kBlockK rows
template <typename T>
void selected_scores(const T* q, int64_t qrow, int64_t rows, int64_t D, const T* k, int64_t ldk, const int64_t* idx,
                     int64_t n, T* s, int64_t lds, std::vector<T>& kbuf) {
  if (rows > kDirectRows) {
    for (int64_t j0 = 0; j0 < n; j0 += kBlockK) {
      const int64_t nb = std::min(kBlockK, n - j0);
      for (int64_t c = 0; c < nb; ++c) {
        if (j0 + c + kAhead < n) prefetch_row(k + idx[j0 + c + kAhead] * ldk, D);
        std::memcpy(kbuf.data() + c * D, k + idx[j0 + c] * ldk, D * sizeof(T));
      }
      gemm('T', nb, rows, D, kbuf.data(), D, q, qrow, T(0), s + j0, lds);
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) {
    if (c + kAhead < n) prefetch_row(k + idx[c + kAhead] * ldk, D);
    const T* kr = k + idx[c] * ldk;
    for (int64_t r = 0; r < rows; ++r) {
      const T* qr = q + r * qrow;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += qr[d] * kr[d];
      s[r * lds + c] = sum;
    }
  }
}

// acc_r (Dv) += sum_c p[r * lds + c] v_{idx[c]} for the rows r < rows <= kDirectRows, the rows idx[0, n) of v
// (row stride ldv) read in place
template <typename T>
void selected_values(const T* p, int64_t lds, int64_t rows, int64_t Dv, const T* v, int64_t ldv, const int64_t* idx,
                     int64_t n, T* acc) {
  for (int64_t c = 0; c < n; ++c) {
    if (c + kAhead < n) prefetch_row(v + idx[c + kAhead] * ldv, Dv);
    const T* vr = v + idx[c] * ldv;
    for (int64_t r = 0; r < rows; ++r) {
      const T w = p[r * lds + c];
      T* ar = acc + r * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) ar[d] += w * vr[d];
    }
  }
}

// one (x, y, query block): rows [i0, i1)
template <typename T>
void block(const Args<T>& a, int64_t x, int64_t y, int64_t i0, int64_t i1, std::vector<T>& s, std::vector<T>& acc,
           std::vector<T>& m, std::vector<T>& l, std::vector<T>& kbuf, std::vector<T>& vbuf) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t rows = i1 - i0;
  const T* q = a.q + x * a.qs[0] + y * a.qs[1] + i0 * a.qs[2];
  const T* k = a.k + x * a.ks[0] + y * a.ks[1];
  const T* v = a.v + x * a.vs[0] + y * a.vs[1];
  const T* mask = a.mask ? a.mask + x * a.ms[0] + y * a.ms[1] : nullptr;
  const int64_t* idx = a.idx ? a.idx + x * a.is[0] + y * a.is[1] : nullptr;
  const bool direct = idx && rows <= kDirectRows;  // the selected rows read in place (else copied for GEMMs)
  std::fill(m.begin(), m.end(), ninf);
  std::fill(l.begin(), l.end(), T(0));
  std::fill(acc.begin(), acc.end(), T(0));
  const int64_t end = a.causal ? std::min(a.Lk, std::max<int64_t>(0, i1 - 1 + a.offset + 1)) : a.Lk;
  const T two_over_cap = a.cap > 0 ? T(2) / a.cap : T(0), minus_two_cap = -2 * a.cap;
  for (int64_t j0 = 0, n = 0; j0 < end; j0 += n) {
    n = std::min(kBlockK, end - j0);
    if (j0 < a.skip_at) n = std::min(n, a.skip_at - j0);  // a block never straddles the skipped rows
    const int64_t row = j0 < a.skip_at ? j0 : j0 + a.skip;
    const T *kb = k + row * a.ks[2], *vb = v + row * a.vs[2];  // this block's keys and values (row strides ldk, ldv)
    int64_t ldk = a.ks[2], ldv = a.vs[2];
    // s (rows x n, row stride kBlockK) = q_block . k_block^T
    if (idx) {
      if (a.pre)  // scored already (tokenselect's vote): K is not read again
        for (int64_t r = 0; r < rows; ++r)
          std::copy(a.pre + (i0 + r) * a.pre_ld + j0, a.pre + (i0 + r) * a.pre_ld + j0 + n, s.data() + r * kBlockK);
      else
        selected_scores(q, a.qs[2], rows, a.D, k, a.ks[2], idx + j0, n, s.data(), kBlockK, kbuf);
      if (!direct) {  // the selected values too, copied into scratch rows for the output GEMM
        for (int64_t c = 0; c < n; ++c) {
          if (j0 + c + kAhead < end) prefetch_row(v + idx[j0 + c + kAhead] * a.vs[2], a.Dv);
          std::memcpy(vbuf.data() + c * a.Dv, v + idx[j0 + c] * a.vs[2], a.Dv * sizeof(T));
        }
        vb = vbuf.data(), ldv = a.Dv;
      }
    } else if (a.k_col > 0) {  // K^T stored contiguous along keys: a plain GEMM (no transposed packing)
      gemm('N', n, rows, a.D, k + row, a.k_col, q, a.qs[2], T(0), s.data(), kBlockK);
    } else {
      gemm('T', n, rows, a.D, kb, ldk, q, a.qs[2], T(0), s.data(), kBlockK);
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s.data() + r * kBlockK;
      const int64_t vis = a.causal ? std::min(n, std::max<int64_t>(0, i0 + r + a.offset - j0 + 1)) : n;
      const T* mr = mask ? mask + (i0 + r) * a.ms[2] + j0 * a.ms[3] : nullptr;
      const T mx = a.cap > 0 ? logits<T, true>(sr, mr, a.ms[3], vis, a.scale, two_over_cap, minus_two_cap)
                             : logits<T, false>(sr, mr, a.ms[3], vis, a.scale, two_over_cap, minus_two_cap);
      softmax_step(sr, vis, n, mx, m[r], l[r], acc.data() + r * a.Dv, a.Dv);
    }
    // acc (rows x Dv) += p (rows x n) . v_block (n x Dv)
    if (direct)
      selected_values(s.data(), kBlockK, rows, a.Dv, v, a.vs[2], idx + j0, n, acc.data());
    else
      gemm('N', a.Dv, rows, n, vb, ldv, s.data(), kBlockK, T(1), acc.data(), a.Dv);
  }
  T* out = a.out + x * a.os[0] + y * a.os[1] + i0 * a.os[2];
  T* lse = a.lse + (x * a.Y + y) * a.Lq + i0;
  for (int64_t r = 0; r < rows; ++r)
    finish_row(acc.data() + r * a.Dv, m[r], l[r], a.cap > 0 ? a.cap : T(0), a.Dv, out + r * a.os[2], lse + r);
}

template <typename T>
void run(Args<T>& a) {
  const int64_t nblocks = (a.Lq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, a.X * a.Y * nblocks, 1, [&](int64_t begin, int64_t stop) {
    attnzoo_flash::SequentialBlas sequential;
    std::vector<T> s(kBlockQ * kBlockK), acc(kBlockQ * a.Dv), m(kBlockQ), l(kBlockQ);
    std::vector<T> kbuf(a.idx ? kBlockK * a.D : 0), vbuf(a.idx ? kBlockK * a.Dv : 0);
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t xy = t / nblocks, i0 = (t % nblocks) * kBlockQ;
      block(a, xy / a.Y, xy % a.Y, i0, std::min(a.Lq, i0 + kBlockQ), s, acc, m, l, kbuf, vbuf);
    }
  });
}

// the operands every call fills alike: q, v, out, lse (and k's pointer), the sizes, no mask, no selection
template <typename T>
Args<T> operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 int64_t Lk, const char* op) {
  Args<T> a{};
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.mask = nullptr;
  a.idx = nullptr;
  a.skip_at = a.skip = 0;
  a.pre = nullptr;
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<T>();
  a.X = q.size(0), a.Y = q.size(1), a.Lq = q.size(2), a.Lk = Lk, a.D = q.size(3), a.Dv = v.size(3);
  operand_strides(q, a.D, a.qs, op, "q");
  operand_strides(v, a.Dv, a.vs, op, "v");
  operand_strides(out, a.Dv, a.os, op, "out");
  return a;
}

// ---- quest's decode step in one call: page selection by key bounds, then the read of the selection in place

// a bound's channel widened to the compute type: bfloat16 is the high half of a float (exact)
inline float widen(uint16_t bf16) {
  const uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(float x) { return x; }

// the bounds of a store's pages: channel-wise key min/max (x, y, page, D) in float32 or bfloat16
struct Bounds {
  const void *kmin, *kmax;
  bool bf16;
  int64_t bs[3];  // strides (x, y, page)
};

// per query row g of q (G x D, row stride qrow) and page p of [p0, p0 + P) of (x, y): sum_d max(q_d kmin_d, q_d kmax_d),
// an upper bound of q . k for every key of the page, into score[g * P + p - p0]. Each term is qpos_d kmax_d +
// qneg_d kmin_d with qpos/qneg the row's positive and negative parts (one of the two products exactly 0).
template <typename T, typename BT>
void page_scores_as(const T* q, int64_t qrow, int64_t G, int64_t D, const BT* kmin, const BT* kmax, int64_t brow,
                    int64_t p0, int64_t P, T* score, std::vector<T>& scratch) {
  scratch.resize((2 * G + 2) * D);
  T *qpos = scratch.data(), *qneg = qpos + G * D, *lo = qneg + G * D, *hi = lo + D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) {
      const T v = q[g * qrow + d];
      qpos[g * D + d] = v > 0 ? v : T(0), qneg[g * D + d] = v < 0 ? v : T(0);
    }
  constexpr int64_t ahead = 8;  // pages prefetched ahead (the hardware prefetcher stops at page boundaries)
  for (int64_t p = 0; p < P; ++p) {
    const BT *a = kmin + (p0 + p) * brow, *b = kmax + (p0 + p) * brow;
    if (p + ahead < P)
      for (int64_t d = 0; d < D; d += 64 / sizeof(BT))
        __builtin_prefetch(a + ahead * brow + d), __builtin_prefetch(b + ahead * brow + d);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) lo[d] = T(widen(a[d])), hi[d] = T(widen(b[d]));
    for (int64_t g = 0; g < G; ++g) {
      const T *qp = qpos + g * D, *qn = qneg + g * D;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += qp[d] * hi[d] + qn[d] * lo[d];
      score[g * P + p] = sum;
    }
  }
}

template <typename T>
void page_scores(const Args<T>& a, const Bounds& w, int64_t x, int64_t y, int64_t p0, int64_t P, T* score,
                 std::vector<T>& scratch) {
  const T* q = a.q + x * a.qs[0] + y * a.qs[1];
  const int64_t off = x * w.bs[0] + y * w.bs[1];
  if (w.bf16)
    page_scores_as(q, a.qs[2], a.Lq, a.D, static_cast<const uint16_t*>(w.kmin) + off,
                   static_cast<const uint16_t*>(w.kmax) + off, w.bs[2], p0, P, score, scratch);
  else
    page_scores_as(q, a.qs[2], a.Lq, a.D, static_cast<const float*>(w.kmin) + off,
                   static_cast<const float*>(w.kmax) + off, w.bs[2], p0, P, score, scratch);
}

// the `take` best of score[0, count) (ties: the lower index) into out, ascending
template <typename T>
void top_sorted(const T* score, int64_t count, int64_t take, std::vector<int64_t>& order, int64_t* out) {
  order.resize(count);
  for (int64_t i = 0; i < count; ++i) order[i] = i;
  std::nth_element(order.begin(), order.begin() + take, order.end(),
                   [score](int64_t i, int64_t j) { return score[i] > score[j] || (score[i] == score[j] && i < j); });
  std::sort(order.begin(), order.begin() + take);
  std::copy(order.begin(), order.begin() + take, out);
}

// per-thread scratch of a selection step
template <typename T>
struct Scratch {
  std::vector<T> score, vote, mask, small, e, s, acc, m, l, kbuf, vbuf, pre;
  std::vector<int64_t> order, rows, cand, pick;
  Scratch(int64_t D, int64_t Dv)
      : s(kBlockQ * kBlockK), acc(kBlockQ * Dv), m(kBlockQ), l(kBlockQ), kbuf(kBlockK * D), vbuf(kBlockK * Dv) {}
};

// the query rows of (x, y) over the slots rows[0, r) of k/v, read in place (valid: (x, y, slot) visibility or nullptr);
// pre: nullptr, or their scores q . k already computed (query row i's at pre[i * r, (i + 1) * r))
template <typename T>
void read_rows(const Args<T>& a, const bool* valid, const int64_t vs[3], int64_t x, int64_t y, const int64_t* rows,
               int64_t r, Scratch<T>& w, const T* pre = nullptr) {
  Args<T> b = a;  // this item's rows (and their padding) as the capped kernel's selection
  b.idx = rows, b.is[0] = b.is[1] = 0, b.Lk = r, b.pre = pre, b.pre_ld = r;
  b.ms[0] = b.ms[1] = b.ms[2] = 0, b.ms[3] = 1;  // a row's padding: one mask row over its r keys
  if (valid) {
    const bool* vr = valid + x * vs[0] + y * vs[1];
    w.mask.resize(r);
    for (int64_t j = 0; j < r; ++j) w.mask[j] = vr[rows[j] * vs[2]] ? T(0) : -std::numeric_limits<T>::infinity();
    b.mask = w.mask.data();
  }
  for (int64_t i0 = 0; i0 < a.Lq; i0 += kBlockQ)
    block(b, x, y, i0, std::min(a.Lq, i0 + kBlockQ), w.s, w.acc, w.m, w.l, w.kbuf, w.vbuf);
}

struct Select {
  Bounds b;
  const bool* valid;  // nullptr, or (x, y, slot) visibility
  int64_t vs[3];
  const int64_t* fixed;  // nullptr, or the selection to read instead of selecting (quest: per (x, y); else per x)
  int64_t fs[2];
  int64_t* chosen;  // out: the selection, sorted
  int64_t page, unit, lo, hi, n, take, cand;
};

// quest, one (x, y): score the units of the middle slots [lo, hi) (a unit: the max over its pages and the query
// rows), keep the `take` best, and attend the query rows over the sink slots [0, lo), the selected units' slots
// and the local slots [hi, n)
template <typename T>
void quest_item(const Args<T>& a, const Select& w, int64_t x, int64_t y, Scratch<T>& t) {
  const int64_t per = w.unit / w.page, U = (w.hi - w.lo) / w.unit, P = U * per;
  int64_t* sel = w.chosen + (x * a.Y + y) * w.take;
  if (w.fixed) {
    const int64_t* f = w.fixed + x * w.fs[0] + y * w.fs[1];
    std::copy(f, f + w.take, sel);
  } else {
    t.score.resize(a.Lq * P);
    page_scores(a, w.b, x, y, w.lo / w.page, P, t.score.data(), t.small);
    for (int64_t u = 0; u < U; ++u) {
      T best = -std::numeric_limits<T>::infinity();
      for (int64_t g = 0; g < a.Lq; ++g)
        for (int64_t p = u * per; p < (u + 1) * per; ++p) best = std::max(best, t.score[g * P + p]);
      t.score[u] = best;
    }
    top_sorted(t.score.data(), U, w.take, t.order, sel);
    for (int64_t i = 0; i < w.take; ++i) sel[i] += w.lo / w.unit;
  }
  t.rows.resize(w.lo + w.take * w.unit + w.n - w.hi);
  int64_t r = 0;
  for (int64_t j = 0; j < w.lo; ++j) t.rows[r++] = j;
  for (int64_t i = 0; i < w.take; ++i)
    for (int64_t j = 0; j < w.unit; ++j) t.rows[r++] = sel[i] * w.unit + j;
  for (int64_t j = w.hi; j < w.n; ++j) t.rows[r++] = j;
  read_rows(a, w.valid, w.vs, x, y, t.rows.data(), r, t);
}

// adds sum_c softmax(scale * row)_c to vote[c] for one score row (-inf: hidden); a row seeing nothing adds nothing
template <typename T>
void add_softmax(const T* row, int64_t count, T scale, T* vote, std::vector<T>& e) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < count; ++c) mx = std::max(mx, row[c]);
  if (mx == -std::numeric_limits<T>::infinity()) return;
  e.resize(count);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < count; ++c) {
    e[c] = fast_exp(scale * (row[c] - mx));
    sum += e[c];
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) vote[c] += e[c] * inv;
}

// the soft vote sum_{y,g} softmax_c(scale * q . k_c) over the candidate slots t.cand (padding hidden) into t.vote,
// the scores q . k_c (-inf: padding) kept in t.score (query row g of head y: row y * G + g, M long) for the read;
// `run`: the candidates are one run of consecutive slots, read by the score GEMM in place (else selected_scores)
template <typename T>
void token_vote(const Args<T>& a, const Select& w, int64_t x, Scratch<T>& t, bool run) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t M = t.cand.size();
  t.score.resize(a.Y * a.Lq * M);
  t.vote.assign(M, T(0));
  for (int64_t y = 0; y < a.Y; ++y) {  // exact scores of the candidates
    const T* q = a.q + x * a.qs[0] + y * a.qs[1];
    T* score = t.score.data() + y * a.Lq * M;
    const T* k = a.k + x * a.ks[0] + y * a.ks[1];
    const bool* vr = w.valid ? w.valid + x * w.vs[0] + y * w.vs[1] : nullptr;
    if (M == 0) break;
    if (run)  // one run of consecutive rows: read in place by the GEMM
      gemm('T', M, a.Lq, a.D, k + t.cand[0] * a.ks[2], a.ks[2], q, a.qs[2], T(0), score, M);
    else
      selected_scores(q, a.qs[2], a.Lq, a.D, k, a.ks[2], t.cand.data(), M, score, M, t.kbuf);
    if (vr)
      for (int64_t g = 0; g < a.Lq; ++g)
        for (int64_t c = 0; c < M; ++c)
          if (!vr[t.cand[c] * w.vs[2]]) score[g * M + c] = ninf;
    for (int64_t g = 0; g < a.Lq; ++g) add_softmax(score + g * M, M, a.scale, t.vote.data(), t.e);
  }
}

// tokenselect, one batch row x (its selection is shared by every head). cand == 0: every middle token [lo, hi) gets
// the soft vote sum_{y,g} softmax_c(scale * q . k_c) (the exact vote). cand > 0, page-first: the middle pages (those
// overlapping [lo, hi)) get the soft vote sum_{y,g} softmax_p(scale * bound), and only the tokens of the `cand` best
// pages (within [lo, hi)) are scored and voted on. The `take` best tokens with the sinks and the local slots are read
// by every head; the selected tokens' scores are the vote's (their keys are not read twice).
template <typename T>
void tokenselect_item(const Args<T>& a, const Select& w, int64_t x, Scratch<T>& t) {
  int64_t* sel = w.chosen + x * w.take;
  const bool voted = !w.fixed;  // t.score holds every head's scores of the candidates t.cand, t.pick the chosen ones
  if (w.fixed) {
    const int64_t* f = w.fixed + x * w.fs[0];
    if (f != sel) std::copy(f, f + w.take, sel);
  } else if (w.cand == 0) {  // the exact vote: every middle token a candidate (its rows read in place by the GEMM)
    t.cand.resize(w.hi - w.lo);
    for (int64_t j = w.lo; j < w.hi; ++j) t.cand[j - w.lo] = j;
    token_vote(a, w, x, t, true);
  } else {
    const int64_t p0 = w.lo / w.page, P = (w.hi + w.page - 1) / w.page - p0;
    t.score.resize(a.Lq * P);
    t.vote.assign(P, T(0));
    for (int64_t y = 0; y < a.Y; ++y) {
      page_scores(a, w.b, x, y, p0, P, t.score.data(), t.small);
      for (int64_t g = 0; g < a.Lq; ++g) add_softmax(t.score.data() + g * P, P, a.scale, t.vote.data(), t.e);
    }
    const int64_t C = std::min(w.cand, P);
    std::vector<int64_t> pages(C);
    top_sorted(t.vote.data(), P, C, t.order, pages.data());
    t.cand.clear();
    for (int64_t i = 0; i < C; ++i)
      for (int64_t j = std::max(w.lo, (p0 + pages[i]) * w.page); j < std::min(w.hi, (p0 + pages[i] + 1) * w.page); ++j)
        t.cand.push_back(j);
    token_vote(a, w, x, t, false);
  }
  const int64_t M = t.cand.size(), r = w.lo + w.take + w.n - w.hi, G = a.Lq;
  if (voted) {
    t.pick.resize(w.take);
    top_sorted(t.vote.data(), M, w.take, t.order, t.pick.data());
    for (int64_t i = 0; i < w.take; ++i) sel[i] = t.cand[t.pick[i]];
  }
  t.rows.resize(r);
  int64_t j = 0;
  for (int64_t s = 0; s < w.lo; ++s) t.rows[j++] = s;
  for (int64_t i = 0; i < w.take; ++i) t.rows[j++] = sel[i];
  for (int64_t s = w.hi; s < w.n; ++s) t.rows[j++] = s;
  for (int64_t y = 0; y < a.Y; ++y) {
    if (!voted) {
      read_rows(a, w.valid, w.vs, x, y, t.rows.data(), r, t);
      continue;
    }
    // the sinks' and local slots' scores computed, the selected tokens' copied from the vote
    const T* q = a.q + x * a.qs[0] + y * a.qs[1];
    const T* k = a.k + x * a.ks[0] + y * a.ks[1];
    t.pre.resize(G * r);
    selected_scores(q, a.qs[2], G, a.D, k, a.ks[2], t.rows.data(), w.lo, t.pre.data(), r, t.kbuf);
    selected_scores(q, a.qs[2], G, a.D, k, a.ks[2], t.rows.data() + w.lo + w.take, w.n - w.hi,
                    t.pre.data() + w.lo + w.take, r, t.kbuf);
    for (int64_t g = 0; g < G; ++g) {
      const T* voted_row = t.score.data() + (y * G + g) * M;
      T* pre = t.pre.data() + g * r + w.lo;
      for (int64_t i = 0; i < w.take; ++i) pre[i] = voted_row[t.pick[i]];
    }
    read_rows(a, w.valid, w.vs, x, y, t.rows.data(), r, t, t.pre.data());
  }
}

}  // namespace

// q (X, Y, Lq, D), k (X, Y, Lk, D), v (X, Y, Lk, Dv), mask: additive (X, Y, Lq, Lk) with any strides, or empty;
// idx: (X, Y, Lk') int64 with any strides, or empty: the rows of k and v read (Lk' keys; k, v hold any number);
// skip > 0: rows [skip_at, skip_at + skip) of k and v are not keys (Lk = k's rows - skip; not with idx or causal);
// returns out (X, Y, Lq, Dv) and lse (X, Y, Lq) in q's dtype (float32 or float64)
std::vector<at::Tensor> capped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& mask, double scale, double cap, bool causal,
                                         int64_t offset, const std::optional<at::Tensor>& idx, int64_t skip_at,
                                         int64_t skip) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "capped_attention: q, k, v must be 4-D");
  const bool gathered = idx.has_value() && idx->defined();
  const bool k_col = !gathered && k.stride(3) != 1 && k.stride(2) == 1 && k.size(2) > 1;
  TORCH_CHECK(q.stride(3) == 1 && (k.stride(3) == 1 || k_col) && v.stride(3) == 1,
              "capped_attention: unit last strides (or k transposed in memory)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "capped_attention: dtypes");
  const int64_t X = q.size(0), Y = q.size(1), Lq = q.size(2), D = q.size(3), Dv = v.size(3);
  TORCH_CHECK(skip == 0 || (!gathered && !causal && 0 <= skip_at && skip > 0 && skip_at + skip <= k.size(2)),
              "capped_attention: a skipped range [skip_at, skip_at + skip) within k's rows, without idx or causal");
  const int64_t Lk = gathered ? idx->size(2) : k.size(2) - skip;
  if (gathered) {
    TORCH_CHECK(idx->dim() == 3 && idx->scalar_type() == at::kLong && idx->size(0) == X && idx->size(1) == Y,
                "capped_attention: idx (X, Y, Lk) int64");
    TORCH_CHECK(!causal, "capped_attention: idx reads a selection, not a causal range");
    TORCH_CHECK(Lk == 0 || (idx->min().item<int64_t>() >= 0 && idx->max().item<int64_t>() < k.size(2)),
                "capped_attention: idx out of k's rows");
  }
  auto out = at::empty({X, Y, Lq, Dv}, q.options());
  auto lse = at::empty({X, Y, Lq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "capped_attention", [&] {
    Args<scalar_t> a = operands<scalar_t>(q, k, v, out, lse, Lk, "capped_attention");
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->dim() == 4 && mask->scalar_type() == q.scalar_type(), "capped_attention: mask");
      a.mask = mask->data_ptr<scalar_t>();
      for (int i = 0; i < 4; ++i) a.ms[i] = mask->size(i) == 1 ? 0 : mask->stride(i);
    }
    if (k_col) {  // K^T's rows (one per feature, k.size(2) long) are the BLAS operand
      operand_strides(k.transpose(2, 3), k.size(2), a.ks, "capped_attention", "k (transposed)");
      a.k_col = a.ks[2];
    } else {
      operand_strides(k, D, a.ks, "capped_attention", "k");
      a.k_col = 0;
    }
    if (gathered) {
      a.idx = idx->data_ptr<int64_t>();
      for (int i = 0; i < 2; ++i) a.is[i] = idx->size(i) == 1 ? 0 : idx->stride(i);
      TORCH_CHECK(Lk <= 1 || idx->stride(2) == 1, "capped_attention: idx needs a unit last stride");
    }
    a.scale = static_cast<scalar_t>(scale);
    a.cap = static_cast<scalar_t>(cap);
    a.causal = causal;
    a.offset = offset;
    if (skip > 0) a.skip_at = skip_at, a.skip = skip;
    if (Lq > 0) run(a);
  });
  return {out, lse};
}


namespace {

// the checks and fields shared by quest_attention and tokenselect_attention: the bounds, padding and selection given
Select selection(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& kmin_, const std::optional<at::Tensor>& kmax_,
                 const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& fixed, int64_t page,
                 int64_t lo, int64_t hi, int64_t n, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": 4-D operands");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op, ": dtypes");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op, ": unit last strides");
  const int64_t X = q.size(0), Y = q.size(1), D = q.size(3);
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= n && n <= k.size(2) && n <= v.size(2) && k.size(0) == X &&
                  k.size(1) == Y && v.size(0) == X && v.size(1) == Y && k.size(3) == D,
              op, ": sizes");
  Select w{};
  w.b.kmin = w.b.kmax = nullptr;
  if (page > 0) {  // page bounds given
    TORCH_CHECK(kmin_.has_value() && kmin_->defined() && kmax_.has_value() && kmax_->defined(), op,
                ": page bounds kmin, kmax");
    const at::Tensor &kmin = *kmin_, &kmax = *kmax_;
    TORCH_CHECK(kmin.dim() == 4 && kmin.stride(3) == 1 && kmin.strides() == kmax.strides() &&
                    kmin.sizes() == kmax.sizes() && kmin.scalar_type() == kmax.scalar_type() &&
                    (kmin.scalar_type() == at::kBFloat16 || kmin.scalar_type() == at::kFloat),
                op, ": bounds in bfloat16 or float32, unit last strides, kmin and kmax alike");
    TORCH_CHECK((hi + page - 1) / page <= kmin.size(2) && kmin.size(0) == X && kmin.size(1) == Y &&
                    kmin.size(3) == D,
                op, ": sizes");
    w.b.kmin = kmin.data_ptr(), w.b.kmax = kmax.data_ptr(), w.b.bf16 = kmin.scalar_type() == at::kBFloat16;
    for (int i = 0; i < 3; ++i) w.b.bs[i] = kmin.stride(i);
  }
  w.valid = nullptr;
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->dim() == 3 && valid->scalar_type() == at::kBool && valid->size(0) == X &&
                    valid->size(1) == Y && valid->size(2) >= n,
                op, ": valid (X, Y, >= n) bool");
    w.valid = valid->data_ptr<bool>();
    for (int i = 0; i < 3; ++i) w.vs[i] = valid->size(i) == 1 ? 0 : valid->stride(i);
  }
  w.fixed = nullptr;
  if (fixed.has_value() && fixed->defined()) {
    TORCH_CHECK(fixed->scalar_type() == at::kLong && fixed->stride(-1) == 1, op, ": fixed int64, unit last stride");
    w.fixed = fixed->data_ptr<int64_t>();
    for (int i = 0; i + 1 < fixed->dim(); ++i) w.fs[i] = fixed->size(i) == 1 ? 0 : fixed->stride(i);
  }
  w.page = page, w.lo = lo, w.hi = hi, w.n = n;
  return w;
}

// runs item(a, t, index) for index in [0, count) in parallel, a per-thread Scratch each
template <typename F>
void run_items(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
               double scale, int64_t count, const char* op, F item) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "select_attention", [&] {
    Args<scalar_t> a = operands<scalar_t>(q, k, v, out, lse, 0, op);
    operand_strides(k, a.D, a.ks, op, "k");
    a.k_col = 0;
    a.scale = static_cast<scalar_t>(scale);
    a.cap = 0, a.causal = false, a.offset = 0;
    if (a.Lq == 0) return;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t stop) {
      attnzoo_flash::SequentialBlas sequential;
      Scratch<scalar_t> t(a.D, a.Dv);
      for (int64_t i = begin; i < stop; ++i) item(a, t, i);
    });
  });
}

}  // namespace

// quest's decode step: q (B, Hkv, G, D) (a KV head's query rows), k, v (B, Hkv, >= n, D|Dv), kmin, kmax
// (B, Hkv, pages, D) float32 or bfloat16 (channel-wise key bounds per page of `page` slots), valid: (B, Hkv, >= n)
// bool or empty, fixed: (B, Hkv, take) int64 units to read instead of selecting, or empty. Units are `unit` slots
// (a multiple of page); the middle [lo, hi) (multiples of unit) has (hi - lo) / unit of them, of which `take` are
// selected. Returns out (B, Hkv, G, Dv), lse (B, Hkv, G) and the selected units (B, Hkv, take), sorted.
std::vector<at::Tensor> quest_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& kmin, const std::optional<at::Tensor>& kmax,
                                        const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& fixed,
                                        double scale, int64_t page, int64_t unit, int64_t lo, int64_t hi, int64_t n,
                                        int64_t take) {
  Select w = selection(q, k, v, kmin, kmax, valid, fixed, page, lo, hi, n, "quest_attention");
  const int64_t X = q.size(0), Y = q.size(1);
  TORCH_CHECK(page > 0 && unit % page == 0 && lo % unit == 0 && hi % unit == 0 && 0 <= take && take * unit <= hi - lo,
              "quest_attention: sizes");
  if (w.fixed)
    TORCH_CHECK(fixed->dim() == 3 && fixed->size(0) == X && fixed->size(1) == Y && fixed->size(2) == take &&
                    (take == 0 || (fixed->min().item<int64_t>() >= lo / unit && fixed->max().item<int64_t>() < hi / unit)),
                "quest_attention: fixed units (X, Y, take) within the middle");
  auto out = at::empty({X, Y, q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({X, Y, q.size(2)}, q.options());
  auto units = at::empty({X, Y, take}, q.options().dtype(at::kLong));
  w.chosen = units.data_ptr<int64_t>(), w.unit = unit, w.take = take;
  run_items(q, k, v, out, lse, scale, X * Y, "quest_attention",
            [&](const auto& a, auto& t, int64_t i) { quest_item(a, w, i / Y, i % Y, t); });
  return {out, lse, units};
}

namespace {

// whether every batch row's queries q (X, Y, G, D) are similar to the ones that made the selection, ref (alike):
// the mean over its heads of cos(q, ref) >= threshold (tokenselect's reuse rule; cos as torch's cosine_similarity,
// each norm clamped to >= 1e-8)
template <typename T>
bool similar(const at::Tensor& q, const at::Tensor& ref, double threshold) {
  const int64_t X = q.size(0), Y = q.size(1), G = q.size(2), D = q.size(3);
  const T *qp = q.data_ptr<T>(), *rp = ref.data_ptr<T>();
  for (int64_t x = 0; x < X; ++x) {
    double sum = 0;
    for (int64_t y = 0; y < Y; ++y)
      for (int64_t g = 0; g < G; ++g) {
        const T *a = qp + x * q.stride(0) + y * q.stride(1) + g * q.stride(2), *b = rp + ((x * Y + y) * G + g) * D;
        double ab = 0, aa = 0, bb = 0;
        for (int64_t d = 0; d < D; ++d) ab += double(a[d]) * b[d], aa += double(a[d]) * a[d], bb += double(b[d]) * b[d];
        sum += ab / (std::max(std::sqrt(aa), 1e-8) * std::max(std::sqrt(bb), 1e-8));
      }
    if (!(sum / double(Y * G) >= threshold)) return false;
  }
  return true;
}

}  // namespace

// tokenselect's decode step: q (B, Hkv, G, D), k, v, kmin, kmax, valid as quest_attention's (bounds over pages of
// `page` slots); the middle [lo, hi) need not be page-aligned. cand == 0 (page 0, no bounds): every middle token is
// voted on (the exact vote); cand > 0: the `cand` pages of highest soft vote are scored token by token. The `take`
// tokens of highest soft vote (one set per batch row) are read with the sinks [0, lo) and the local slots [hi, n).
// fixed: (B, take) slots to read instead of selecting, or empty. Returns out (B, Hkv, G, Dv), lse (B, Hkv, G) and
// the selected slots (B, take), sorted.
// With ref (B, Hkv, G, D) contiguous in q's dtype, slots (B, take) int64 and counts (2,) int64 (the policy's
// state, updated in place; not with fixed): the step reads `slots` again while a selection exists (counts[0] +
// counts[1] > 0) and the queries stay similar to `ref` (threshold: see `similar`), counting it in counts[1]; else it
// selects into `slots`, copies q into `ref` and counts it in counts[0]. The third result is then empty.
std::vector<at::Tensor> tokenselect_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& kmin,
                                              const std::optional<at::Tensor>& kmax,
                                              const std::optional<at::Tensor>& valid,
                                              const std::optional<at::Tensor>& fixed,
                                              const std::optional<at::Tensor>& ref,
                                              const std::optional<at::Tensor>& slots_io,
                                              const std::optional<at::Tensor>& counts, double scale, int64_t page,
                                              int64_t lo, int64_t hi, int64_t n, int64_t cand, int64_t take,
                                              double threshold) {
  const bool stateful = ref.has_value() && ref->defined();
  TORCH_CHECK(!stateful || (!(fixed.has_value() && fixed->defined()) && slots_io.has_value() && slots_io->defined() &&
                            counts.has_value() && counts->defined()),
              "tokenselect_attention: ref comes with slots and counts, without fixed");
  const at::Tensor* state_slots = stateful ? &*slots_io : nullptr;
  bool reuse = false;
  if (stateful) {
    TORCH_CHECK(ref->sizes() == q.sizes() && ref->scalar_type() == q.scalar_type() && ref->is_contiguous() &&
                    state_slots->dim() == 2 && state_slots->size(0) == q.size(0) && state_slots->size(1) == take &&
                    state_slots->scalar_type() == at::kLong && state_slots->is_contiguous() &&
                    counts->numel() == 2 && counts->scalar_type() == at::kLong && counts->is_contiguous(),
                "tokenselect_attention: ref (B, Hkv, G, D) like q, slots (B, take) int64, counts (2,) int64, "
                "contiguous");
    const int64_t* c = counts->data_ptr<int64_t>();
    if (c[0] + c[1] > 0)
      AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tokenselect_reuse",
                                 [&] { reuse = similar<scalar_t>(q, *ref, threshold); });
  }
  Select w = selection(q, k, v, kmin, kmax, valid, reuse ? *slots_io : fixed, page, lo, hi, n,
                       "tokenselect_attention");
  const int64_t X = q.size(0), Y = q.size(1);
  TORCH_CHECK(0 <= take && take <= hi - lo &&
                  (cand == 0 ? page == 0 : cand >= 1 && page > 0 && take <= (cand - 2) * page),
              "tokenselect_attention: sizes");
  if (w.fixed) {
    const at::Tensor& f = reuse ? *slots_io : *fixed;
    TORCH_CHECK(f.dim() == 2 && f.size(0) == X && f.size(1) == take, "tokenselect_attention: fixed slots (X, take)");
    for (int64_t x = 0; x < X; ++x)
      for (int64_t i = 0; i < take; ++i) {
        const int64_t j = w.fixed[x * w.fs[0] + i];
        TORCH_CHECK(lo <= j && j < hi, "tokenselect_attention: fixed slots within the middle [", lo, ", ", hi, ")");
      }
  }
  auto out = at::empty({X, Y, q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({X, Y, q.size(2)}, q.options());
  auto slots = stateful ? *state_slots : at::empty({X, take}, q.options().dtype(at::kLong));
  w.chosen = slots.data_ptr<int64_t>(), w.unit = 1, w.take = take, w.cand = cand;
  run_items(q, k, v, out, lse, scale, X, "tokenselect_attention",
            [&](const auto& a, auto& t, int64_t i) { tokenselect_item(a, w, i, t); });
  if (stateful) {
    if (!reuse) ref->copy_(q);
    counts->data_ptr<int64_t>()[reuse ? 1 : 0] += 1;
    return {out, lse, at::empty({0}, slots.options())};
  }
  return {out, lse, slots};
}

namespace {

// a key channel as a bound's float32: itself, or a double rounded outward (the nearest float on the bound's side)
inline float outward_float(float x, bool) { return x; }
inline float outward_float(double x, bool up) {
  float r = static_cast<float>(x);
  if (up ? double(r) < x : double(r) > x) r = std::nextafter(r, up ? INFINITY : -INFINITY);
  return r;
}
// a float as a bfloat16 bound rounded outward: truncation rounds toward zero, one step away from it (the bits'
// magnitude + 1) where that is the wrong side (up for a positive value, down for a negative one)
inline uint16_t outward_bf16(float x, bool up) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  uint32_t t = bits & 0xFFFF0000u;
  if (t != bits && up != bool(bits >> 31)) t += 0x10000u;
  return uint16_t(t >> 16);
}

template <typename T, typename BT>
void page_bounds_as(const at::Tensor& k, at::Tensor& kmin, at::Tensor& kmax, int64_t p0, int64_t n, int64_t page) {
  const int64_t X = k.size(0), Y = k.size(1), D = k.size(3), P = (n + page - 1) / page;
  const T* kp = k.data_ptr<T>();
  BT *lo = static_cast<BT*>(kmin.data_ptr()), *hi = static_cast<BT*>(kmax.data_ptr());
  std::vector<T> mn(D), mx(D);
  for (int64_t x = 0; x < X; ++x)
    for (int64_t y = 0; y < Y; ++y)
      for (int64_t p = p0; p < P; ++p) {
        const T* row = kp + x * k.stride(0) + y * k.stride(1) + p * page * k.stride(2);
        std::copy(row, row + D, mn.begin());
        std::copy(row, row + D, mx.begin());
        for (int64_t j = p * page + 1; j < std::min(n, (p + 1) * page); ++j) {
          row += k.stride(2);
          for (int64_t d = 0; d < D; ++d) mn[d] = std::min(mn[d], row[d]), mx[d] = std::max(mx[d], row[d]);
        }
        const int64_t o = x * kmin.stride(0) + y * kmin.stride(1) + p * kmin.stride(2);
        for (int64_t d = 0; d < D; ++d) {
          if constexpr (std::is_same_v<BT, uint16_t>) {
            lo[o + d] = outward_bf16(outward_float(mn[d], false), false);
            hi[o + d] = outward_bf16(outward_float(mx[d], true), true);
          } else {
            lo[o + d] = outward_float(mn[d], false), hi[o + d] = outward_float(mx[d], true);
          }
        }
      }
}

}  // namespace

// a store's page bounds after an append: k (X, Y, >= n, D) float32/64 (unit last stride), kmin and kmax (X, Y,
// >= ceil(n / page), D) float32 or bfloat16 alike (unit last stride); pages p0 .. ceil(n / page) - 1 get the
// channel-wise min / max of their held slots (< n), rounded outward into the bounds' dtype (attnzoo.cache.store)
void page_bounds(const at::Tensor& k, at::Tensor kmin, at::Tensor kmax, int64_t p0, int64_t n, int64_t page) {
  TORCH_CHECK(k.dim() == 4 && kmin.dim() == 4 && kmin.sizes() == kmax.sizes() && kmin.strides() == kmax.strides() &&
                  kmin.scalar_type() == kmax.scalar_type() && k.stride(3) == 1 && kmin.stride(3) == 1 &&
                  kmin.size(0) == k.size(0) && kmin.size(1) == k.size(1) && kmin.size(3) == k.size(3),
              "page_bounds: k (X, Y, >= n, D), kmin and kmax (X, Y, pages, D) alike, unit last strides");
  TORCH_CHECK(page > 0 && 0 <= p0 && n <= k.size(2) && (n + page - 1) / page <= kmin.size(2),
              "page_bounds: sizes");
  TORCH_CHECK(kmin.scalar_type() == at::kBFloat16 || kmin.scalar_type() == at::kFloat,
              "page_bounds: bounds in float32 or bfloat16");
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "page_bounds", [&] {
    if (kmin.scalar_type() == at::kBFloat16)
      page_bounds_as<scalar_t, uint16_t>(k, kmin, kmax, p0, n, page);
    else
      page_bounds_as<scalar_t, float>(k, kmin, kmax, p0, n, page);
  });
}

namespace {

// max |x| over the rows [0, n) of t (X, Y, n, D), unit last stride; NaN when any element is NaN, inf when one is.
// Work units of up to kPeakRun elements (a (x, y) slab whose rows are adjacent is cut into runs; otherwise a unit
// is a row) on torch's threads: max and "any NaN" do not depend on the order, so neither does the result.
constexpr int64_t kPeakRun = 1 << 14;

template <typename T>
double peak_of(const at::Tensor& t) {
  const T* p = t.data_ptr<T>();
  const int64_t Y = t.size(1), n = t.size(2), D = t.size(3);
  if (!t.numel()) return 0.0;
  const bool slab = n == 1 || t.stride(2) == D;  // the slab's rows adjacent: one run of n * D
  const int64_t len = slab ? n * D : D, per = slab ? (len + kPeakRun - 1) / kPeakRun : n;
  const int64_t units = t.size(0) * Y * per;
  T mx = 0;
  bool nan = false;
  std::mutex m;
  at::parallel_for(0, units, std::max<int64_t>(1, kPeakRun / std::min(len, kPeakRun)), [&](int64_t b, int64_t e) {
    T lm = 0;
    int ln = 0;
    for (int64_t u = b; u < e; ++u) {
      const int64_t xy = u / per, c = u % per;
      const T* row = p + xy / Y * t.stride(0) + xy % Y * t.stride(1);
      int64_t lo = 0, hi = len;
      if (slab)
        lo = c * kPeakRun, hi = std::min(len, lo + kPeakRun);
      else
        row += c * t.stride(2);
#pragma omp simd reduction(max : lm) reduction(| : ln)
      for (int64_t d = lo; d < hi; ++d) {
        const T a = std::abs(row[d]);
        ln |= a != a;
        lm = a > lm ? a : lm;
      }
    }
    std::lock_guard<std::mutex> lock(m);
    mx = std::max(mx, lm);
    nan |= ln != 0;
  });
  return nan ? std::numeric_limits<double>::quiet_NaN() : double(mx);
}

// rows [0, n) of src (X, Y, n, D) into rows [at, at + n) of dst (X, Y, >= at + n, D), unit last strides
template <typename T>
void copy_rows(const at::Tensor& src, at::Tensor& dst, int64_t at) {
  const T* s = src.data_ptr<T>();
  T* d = dst.data_ptr<T>();
  const int64_t D = src.size(3);
  for (int64_t x = 0; x < src.size(0); ++x)
    for (int64_t y = 0; y < src.size(1); ++y)
      for (int64_t i = 0; i < src.size(2); ++i)
        std::memcpy(d + x * dst.stride(0) + y * dst.stride(1) + (at + i) * dst.stride(2),
                    s + x * src.stride(0) + y * src.stride(1) + i * src.stride(2), D * sizeof(T));
}

}  // namespace

// a store's append of n new tokens in one call (attnzoo.cache.store.Store.append_rows): k, v (X, Y, n, D|Dv)
// float32/64 with unit last strides; returns [max |k|, max |v|] (NaN/inf when not finite: then nothing is
// written). Else the rows go to slots [n0, n0 + n) of kbuf and vbuf (X, Y, >= n0 + n, ·; their dtype), pos
// (X, Y, >= n0 + n) int32 gets positions start .. start + n - 1, and with page > 0 the touched pages' bounds in
// kmin/kmax are recomputed as page_bounds does. check: scan for the peaks (else both are returned as 0).
std::vector<double> append_rows(const at::Tensor& k, const at::Tensor& v, at::Tensor kbuf, at::Tensor vbuf,
                                at::Tensor pos, const std::optional<at::Tensor>& kmin,
                                const std::optional<at::Tensor>& kmax, int64_t n0, int64_t start, int64_t page,
                                bool check) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && kbuf.dim() == 4 && vbuf.dim() == 4 && pos.dim() == 3 &&
                  k.scalar_type() == v.scalar_type() && kbuf.scalar_type() == k.scalar_type() &&
                  vbuf.scalar_type() == k.scalar_type() && pos.scalar_type() == at::kInt && k.stride(3) == 1 &&
                  v.stride(3) == 1 && kbuf.stride(3) == 1 && vbuf.stride(3) == 1 && pos.stride(2) == 1,
              "append_rows: k, v (X, Y, n, D) and their buffers alike with unit last strides, pos int32");
  const int64_t X = k.size(0), Y = k.size(1), n = k.size(2);
  TORCH_CHECK(v.size(0) == X && v.size(1) == Y && v.size(2) == n && kbuf.size(0) == X && kbuf.size(1) == Y &&
                  kbuf.size(3) == k.size(3) && vbuf.size(0) == X && vbuf.size(1) == Y && vbuf.size(3) == v.size(3) &&
                  pos.size(0) == X && pos.size(1) == Y && 0 <= n0 && n0 + n <= kbuf.size(2) &&
                  n0 + n <= vbuf.size(2) && n0 + n <= pos.size(2),
              "append_rows: sizes");
  std::vector<double> peaks{0.0, 0.0};
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "append_rows", [&] {
    if (check) peaks = {peak_of<scalar_t>(k), peak_of<scalar_t>(v)};
    if (!std::isfinite(peaks[0]) || !std::isfinite(peaks[1])) return;
    copy_rows<scalar_t>(k, kbuf, n0);
    copy_rows<scalar_t>(v, vbuf, n0);
  });
  if (!std::isfinite(peaks[0]) || !std::isfinite(peaks[1])) return peaks;
  int32_t* p = pos.data_ptr<int32_t>();
  for (int64_t x = 0; x < X; ++x)
    for (int64_t y = 0; y < Y; ++y)
      for (int64_t i = 0; i < n; ++i) p[x * pos.stride(0) + y * pos.stride(1) + n0 + i] = int32_t(start + i);
  if (page > 0) {
    TORCH_CHECK(kmin.has_value() && kmin->defined() && kmax.has_value() && kmax->defined(), "append_rows: bounds");
    page_bounds(kbuf, *kmin, *kmax, n0 / page, n0 + n, page);
  }
  return peaks;
}

// max |t| of a 4-D float32/64 tensor with a unit last stride (attnzoo.checks' finiteness scan): NaN when any
// element is NaN, inf when one is inf
double peak(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "peak: a 4-D tensor with a unit last stride");
  double out = 0.0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "peak", [&] { out = peak_of<scalar_t>(t); });
  return out;
}

TORCH_LIBRARY(attnzoo, m) {
  m.def("peak(Tensor t) -> float", &peak);
  m.def("page_bounds(Tensor k, Tensor(a!) kmin, Tensor(b!) kmax, int p0, int n, int page) -> ()", &page_bounds);
  m.def("append_rows(Tensor k, Tensor v, Tensor(a!) kbuf, Tensor(b!) vbuf, Tensor(c!) pos, Tensor(d!)? kmin, "
        "Tensor(e!)? kmax, int n0, int start, int page, bool check) -> float[]",
        &append_rows);
  m.def("capped_attention", &capped_attention);
  m.def("quest_attention", &quest_attention);
  m.def("tokenselect_attention(Tensor q, Tensor k, Tensor v, Tensor? kmin, Tensor? kmax, Tensor? valid, Tensor? fixed, "
        "Tensor(a!)? ref, Tensor(b!)? slots, Tensor(c!)? counts, float scale, int page, int lo, int hi, int n, "
        "int cand, int take, float threshold) -> Tensor[]",
        &tokenselect_attention);
}
