// Block-sparse CPU attention straight from a BlockLayout's key-block lists (attnzoo.core.blockkernel).
//
// out, lse = attention of each query block over the key blocks its layout row lists, where
//   q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): any strides with a unit last one;
//   blocks (Bl, Hl, nq | 1, S) int64, contiguous: key-block indices, -1 = empty slot (Bl 1 or B; Hl 1, Hkv or Hq;
//   one row (dim 2 of size 1): the same for every query block, e.g. a token layout's shared columns);
//   skip (Bs, Hs, nq, S2) int64 or empty: key blocks of skip_block_k keys whose keys a query block does not read
//   (a token layout without the tokens a block layout reads; Bs 1 or B, Hs 1, Hkv or Hq);
//   causal: key j visible to query i when j <= i + offset (bottom-right: offset = Nk - Nq);
//   pad (B, Nk) bool, contiguous, or empty: False hides a key;
//   bias (Hb, L), contiguous, q's dtype, or empty: a distance bias added to the scores, row h (Hb == Hq) or 0
//   (Hb == 1) at column d - bias_lo for the distance d = key - query position (every d a visible score has);
//   cap > 0: the soft cap cap * tanh(x / cap) after the bias (held as the capped logit minus cap, as in
//   capped_attention.cpp: -2 cap / (exp(2x / cap) + 1), one vectorised pass; the lse adds cap back).
// A work item is (batch row, query heads sharing one layout row, query block): its rows (every such head's
// block_q queries, scaled, packed into one matrix) walk the listed key blocks, adjacent blocks merged into one
// run read in place (no gather), short runs packed into one chunk (no bias), in chunks of at most kBlockK keys:
// one GEMM for the scores, one pass for exp + row sum
// against the row's maximum so far (lazy_step; a row's first chunk, padding, a bias or a cap take a pass for the
// maximum first), one GEMM into the output. Keys past the row's
// position (causal) or past Nk are never read. Rows that see no key give (0, -inf).
// 512-bit vectors for the row passes (GCC tunes -march=native on this CPU to 256-bit ones)
#pragma GCC target("prefer-vector-width=512")
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "flash_common.h"

// MKL's bfloat16 GEMM with float32 results (AMX tiles where the CPU has them; libtorch_cpu exports it when torch
// is built with MKL): weak, so the extension loads without it and block_lse then multiplies in float32
extern "C" void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha, const uint16_t* a,
                                       int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));

namespace {

using attnzoo_flash::exp_clamped;
using attnzoo_flash::fast_exp;
using attnzoo_flash::finish_row;
using attnzoo_flash::gemm;
using attnzoo_flash::softmax_step;

constexpr int64_t kBlockK = 512;  // keys per score block
constexpr int64_t kRows = 256;    // query rows per score block

template <typename T>
struct Args {
  const T *q, *k, *v;
  const int64_t* blocks;
  const bool* pad;  // this batch row's key padding (nullptr: none)
  const T* bias;    // this item's first head's distance-bias row (nullptr: none)
  int64_t bias_rows, bias_len, bias_lo;
  T *out, *lse;
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
  int64_t qs[3], ks[3], vs[3], os[3];  // strides (batch, head, row)
  int64_t Bl, Hl, nqb, S, block_q, block_k;
  int64_t heads;  // query heads per work item (sharing one layout row)
  bool shared;    // one layout row for every query block (blocks' dim 2 of size 1)
  const int64_t* skip;  // (Bs, Hs, nqb, S2) key blocks of skip_bk keys not read (nullptr: none)
  int64_t Bs, Hs, S2, skip_bk;
  // a shared token row read whole from packed copies (no bias): keys (P, S, D), values (P, S, Dv), padding
  // (P, S) per (batch row, pack head): pack head = the layout head with per-query-head rows, else the KV head
  const T *kp, *vp;
  const bool* pp;
  int64_t P;
  T scale, cap;
  bool causal;
  int64_t offset;
};

// the key runs [start, end) a layout row reads: adjacent blocks merged, clipped to Nk and to `limit`, from
// `from` on; one-key blocks (tokens) in a key block of `skip_bk` keys that `marks` flags are left out
inline void key_runs(const int64_t* row, int64_t S, int64_t block_k, int64_t Nk, int64_t limit,
                     std::vector<std::pair<int64_t, int64_t>>& runs, const std::vector<uint8_t>& marks,
                     int64_t skip_bk, int64_t from = 0) {
  runs.clear();
  for (int64_t s = 0; s < S; ++s) {
    if (row[s] < 0) continue;
    const int64_t j0 = row[s] * block_k, j1 = std::min({Nk, j0 + block_k, limit});
    if (j1 <= j0 || j0 < from) continue;
    if (!marks.empty() && marks[j0 / skip_bk]) continue;
    if (!runs.empty() && runs.back().second == j0)
      runs.back().second = j1;
    else
      runs.emplace_back(j0, j1);
  }
}

// one row's visible scores in place: the distance bias, the soft cap, key padding (-inf); returns their maximum
template <typename T, bool PAD, bool BIAS, bool CAP>
inline T row_pass(T* sr, const bool* pr, const T* br, int64_t vis, T two_over_cap, T minus_two_cap) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T mx = ninf;
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < vis; ++c) {
    T x = sr[c];
    if (BIAS) x += br[c];
    if (CAP) x = minus_two_cap / (fast_exp(x * two_over_cap) + T(1));
    if (PAD) x = pr[c] ? x : ninf;
    sr[c] = x;
    mx = x > mx ? x : mx;
  }
  return mx;
}

template <typename T, bool PAD, bool BIAS>
inline T row_pass(T* sr, const bool* pr, const T* br, int64_t vis, T cap) {
  return cap > 0 ? row_pass<T, PAD, BIAS, true>(sr, pr, br, vis, T(2) / cap, -T(2) * cap)
                 : row_pass<T, PAD, BIAS, false>(sr, pr, br, vis, T(0), T(0));
}

template <typename T>
inline T row_pass(T* sr, const bool* pr, const T* br, int64_t vis, T cap) {
  if (pr) return br ? row_pass<T, true, true>(sr, pr, br, vis, cap) : row_pass<T, true, false>(sr, pr, br, vis, cap);
  return br ? row_pass<T, false, true>(sr, pr, br, vis, cap) : row_pass<T, false, false>(sr, pr, br, vis, cap);
}

// the online-softmax step of a row that has seen keys (its maximum m finite) in one pass over the block's
// scores, without their maximum first: the weights exp(s - m) against the row's maximum so far, their sum and
// the block's maximum together. The row keeps m (its output is not rescaled) while the block's maximum is at
// most kLazy above it: the weights stay below e^kLazy, and lse = m + log(l) holds for any m. Above that the
// weights, still exact, are rescaled to the new maximum by one multiply; returns false (nothing kept: sr now
// holds weights, not scores) when they may have overflowed (a maximum jump > kSafe), for the caller to redo the
// block from its scores. Rows read the sink block first, which usually holds their maximum.
constexpr float kLazy = 20.0f, kSafe = 80.0f;

template <typename T>
inline bool lazy_step(T* sr, int64_t vis, int64_t n, T& m, T& l, T* acc, int64_t Dv) {
  T mx = -std::numeric_limits<T>::infinity(), sum = 0;
#pragma omp simd reduction(max : mx) reduction(+ : sum)
  for (int64_t c = 0; c < vis; ++c) {
    const T x = sr[c];
    mx = x > mx ? x : mx;
    const T p = exp_clamped(x - m);  // scores are finite; e^-87.3 for 0 adds nothing a row's sum (>= 1) keeps
    sr[c] = p;
    sum += p;
  }
  std::fill(sr + vis, sr + n, T(0));
  if (mx <= m + T(kLazy)) {
    l += sum;
    return true;
  }
  if (mx > m + T(kSafe)) return false;
  const T f = std::exp(m - mx);
#pragma omp simd
  for (int64_t c = 0; c < vis; ++c) sr[c] *= f;
  l = (l + sum) * f;
  for (int64_t d = 0; d < Dv; ++d) acc[d] *= f;
  m = mx;
  return true;
}

// per-thread buffers of a work item's tiles: scores, output accumulator, row maxima and sums, and the packed keys,
// values and key padding of a chunk gathered from several short runs
template <typename T>
struct Scratch {
  std::vector<T> s, acc, m, l, kp, vp;
  std::unique_ptr<bool[]> pp;
  Scratch(int64_t D, int64_t Dv)
      : s(kRows * kBlockK), acc(kRows * Dv), m(kRows), l(kRows), kp(kBlockK * D), vp(kBlockK * Dv),
        pp(new bool[kBlockK]) {}
};

// rows [r0, r1) of one work item (row rr is query head rr / nr, position i0 + rr % nr). Keys every row of the
// tile sees whole (all of them when not causal) are processed in chunks of up to kBlockK: a long run in place,
// short runs packed together into one chunk (a copy of their rows: a layout's scattered small blocks would
// otherwise each be a small GEMM and a row pass of block_k keys; not with a distance bias, whose row is read
// at the chunk's contiguous distances); keys at the tile's causal diagonal are read in place, each row up to
// its own position.
template <typename T>
void tile(const Args<T>& a, const T* qp, int64_t nr, int64_t r0, int64_t r1, int64_t i0, const T* k, const T* v,
          const std::vector<std::pair<int64_t, int64_t>>& runs, Scratch<T>& w, const T* kp = nullptr,
          const T* vp = nullptr, const bool* keep = nullptr, int64_t packed_n = 0) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t rows = r1 - r0;
  std::fill(w.m.begin(), w.m.begin() + rows, ninf);
  std::fill(w.l.begin(), w.l.begin() + rows, T(0));
  std::fill(w.acc.begin(), w.acc.begin() + rows * a.Dv, T(0));
  // the tile's positions: the least and the greatest (rows wrap over heads)
  int64_t p_lo = i0 + a.offset + r0 % nr, p_hi = i0 + a.offset + (r1 - 1) % nr;
  if (r1 - r0 >= nr || (r1 - 1) % nr < r0 % nr) p_lo = i0 + a.offset, p_hi = i0 + a.offset + nr - 1;
  // one chunk of n keys (rows of kc, ldk; values vc, ldv; padding pc or nullptr), from key j0 on when read in
  // place (packed: j0 unused, no bias); `whole`: every row sees all n, else row r sees keys up to its position
  auto chunk = [&](const T* kc, int64_t ldk, const T* vc, int64_t ldv, const bool* pc, int64_t n, int64_t j0,
                   bool whole) {
    // s (rows x n, row stride kBlockK) = q_rows . k_chunk^T
    gemm('T', n, rows, a.D, kc, ldk, qp + r0 * a.D, a.D, T(0), w.s.data(), kBlockK);
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = w.s.data() + r * kBlockK;
      const int64_t vis = whole ? n : std::min(n, std::max<int64_t>(0, i0 + a.offset + (r0 + r) % nr - j0 + 1));
      if (vis == 0) {
        std::fill(sr, sr + n, T(0));
        continue;
      }
      // the bias of this row's keys j0, j0 + 1, ...: distances j0 - position, ...
      const T* br = a.bias ? a.bias + (a.bias_rows == 1 ? 0 : (r0 + r) / nr * a.bias_len) +
                                 (j0 - i0 - a.offset - (r0 + r) % nr - a.bias_lo)
                           : nullptr;
      // no padding, bias or cap (the scores as they are) and a row that has seen keys: one pass
      if (!pc && !br && !(a.cap > 0) && w.m[r] > ninf) {
        if (lazy_step(sr, vis, n, w.m[r], w.l[r], w.acc.data() + r * a.Dv, a.Dv)) continue;
        gemm('T', vis, 1, a.D, kc, ldk, qp + (r0 + r) * a.D, a.D, T(0), sr, kBlockK);  // the scores again
      }
      const T mx = row_pass(sr, pc, br, vis, a.cap);
      softmax_step(sr, vis, n, mx, w.m[r], w.l[r], w.acc.data() + r * a.Dv, a.Dv);
    }
    // acc (rows x Dv) += p (rows x n) . v_chunk (n x Dv)
    gemm('N', a.Dv, rows, n, vc, ldv, w.s.data(), kBlockK, T(1), w.acc.data(), a.Dv);
  };
  // a shared token row's packed keys that every row sees, in place in the packed copy (`keep` hides the others)
  for (int64_t c0 = 0; c0 < packed_n; c0 += kBlockK) {
    const int64_t n = std::min(kBlockK, packed_n - c0);
    chunk(kp + c0 * a.D, a.D, vp + c0 * a.Dv, a.Dv, keep + c0, n, 0, true);
  }
  // short whole pieces waiting to be packed into one chunk
  std::vector<std::pair<int64_t, int64_t>> pieces;
  int64_t packed = 0;
  auto flush = [&] {
    if (pieces.size() == 1) {
      const int64_t j0 = pieces[0].first;
      chunk(k + j0 * a.ks[2], a.ks[2], v + j0 * a.vs[2], a.vs[2], a.pad ? a.pad + j0 : nullptr, packed, j0, true);
    } else if (!pieces.empty()) {
      int64_t c = 0;
      for (const auto& pc : pieces)
        for (int64_t j = pc.first; j < pc.second; ++j, ++c) {
          std::copy(k + j * a.ks[2], k + j * a.ks[2] + a.D, w.kp.data() + c * a.D);
          std::copy(v + j * a.vs[2], v + j * a.vs[2] + a.Dv, w.vp.data() + c * a.Dv);
          if (a.pad) w.pp[c] = a.pad[j];
        }
      chunk(w.kp.data(), a.D, w.vp.data(), a.Dv, a.pad ? w.pp.get() : nullptr, packed, 0, true);
    }
    pieces.clear();
    packed = 0;
  };
  attnzoo_flash::walk_runs(runs, a.causal, p_lo, p_hi, kBlockK, a.bias != nullptr, pieces, packed, flush,
                           [&](int64_t j0, int64_t n) {
                             chunk(k + j0 * a.ks[2], a.ks[2], v + j0 * a.vs[2], a.vs[2],
                                   a.pad ? a.pad + j0 : nullptr, n, j0, false);
                           });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t rr = r0 + r, h = rr / nr, i = i0 + rr % nr;
    finish_row(w.acc.data() + r * a.Dv, w.m[r], w.l[r], a.cap > 0 ? a.cap : T(0), a.Dv,
               a.out + h * a.os[1] + i * a.os[2], a.lse + h * a.Nq + i);
  }
}

template <typename T>
void run(const Args<T>& a) {
  const int64_t groups = a.Hq / a.Hkv, items_per_row = a.Hq / a.heads;
  const int64_t nskip = a.skip ? (a.Nk + a.skip_bk - 1) / a.skip_bk : 0;
  at::parallel_for(0, a.B * items_per_row * a.nqb, 1, [&](int64_t begin, int64_t stop) {
    attnzoo_flash::SequentialBlas sequential;
    std::vector<T> qp(a.heads * a.block_q * a.D);
    Scratch<T> w(a.D, a.Dv);
    std::vector<std::pair<int64_t, int64_t>> runs;
    std::vector<uint8_t> marks(nskip, 0);
    std::unique_ptr<bool[]> keep(new bool[a.kp ? a.S : 1]);
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t b = t / (items_per_row * a.nqb), hg = (t / a.nqb) % items_per_row, qb = t % a.nqb;
      const int64_t h0 = hg * a.heads, kv = h0 / groups;
      const int64_t lh = a.Hl == 1 ? 0 : (a.Hl == a.Hkv ? kv : h0);
      const int64_t i0 = qb * a.block_q, nr = std::min(a.Nq, i0 + a.block_q) - i0;
      const int64_t* row = a.blocks + (((a.Bl == 1 ? 0 : b) * a.Hl + lh) * (a.shared ? 1 : a.nqb) +
                                       (a.shared ? 0 : qb)) * a.S;
      const int64_t* srow = nullptr;
      if (a.skip) {
        const int64_t sh = a.Hs == 1 ? 0 : (a.Hs == a.Hkv ? kv : h0);
        srow = a.skip + (((a.Bs == 1 ? 0 : b) * a.Hs + sh) * a.nqb + qb) * a.S2;
        for (int64_t s2 = 0; s2 < a.S2; ++s2)
          if (srow[s2] >= 0 && srow[s2] < nskip) marks[srow[s2]] = 1;
      }
      const int64_t limit = a.causal ? i0 + nr + a.offset : a.Nk;
      int64_t packed_n = 0, ph = 0;
      if (a.kp) {  // the packed tokens every row of the item sees (the others hidden), the rest read in place
        const int64_t seen = a.causal ? i0 + a.offset : a.Nk - 1;
        ph = a.P == a.Hkv ? kv : lh;
        const bool* pp = a.pp ? a.pp + (b * a.P + ph) * a.S : nullptr;
        for (int64_t c = 0; c < a.S; ++c) {
          const int64_t j = row[c];
          keep[c] = j >= 0 && j <= seen && j < a.Nk && (marks.empty() || !marks[j / a.skip_bk]) && (!pp || pp[c]);
          if (keep[c]) packed_n = c + 1;
        }
        key_runs(row, a.S, 1, a.Nk, limit, runs, marks, a.skip_bk, seen + 1);
      } else {
        key_runs(row, a.S, a.block_k, a.Nk, limit, runs, marks, a.skip_bk);
      }
      if (srow)
        for (int64_t s2 = 0; s2 < a.S2; ++s2)
          if (srow[s2] >= 0 && srow[s2] < nskip) marks[srow[s2]] = 0;
      // this item's query rows, scaled, packed (head-major)
      for (int64_t g = 0; g < a.heads; ++g)
        for (int64_t r = 0; r < nr; ++r) {
          const T* src = a.q + b * a.qs[0] + (h0 + g) * a.qs[1] + (i0 + r) * a.qs[2];
          T* dst = qp.data() + (g * nr + r) * a.D;
          for (int64_t d = 0; d < a.D; ++d) dst[d] = src[d] * a.scale;
        }
      Args<T> item = a;  // outputs of this batch row and first head
      item.out = a.out + b * a.os[0] + h0 * a.os[1];
      item.lse = a.lse + (b * a.Hq + h0) * a.Nq;
      item.pad = a.pad ? a.pad + b * a.Nk : nullptr;
      item.bias = a.bias && a.bias_rows > 1 ? a.bias + h0 * a.bias_len : a.bias;
      const T* k = a.k + b * a.ks[0] + kv * a.ks[1];
      const T* v = a.v + b * a.vs[0] + kv * a.vs[1];
      const T* kp = a.kp ? a.kp + (b * a.P + ph) * a.S * a.D : nullptr;
      const T* vp = a.kp ? a.vp + (b * a.P + ph) * a.S * a.Dv : nullptr;
      const int64_t total = a.heads * nr;
      for (int64_t r0 = 0; r0 < total; r0 += kRows)
        tile(item, qp.data(), nr, r0, std::min(total, r0 + kRows), i0, k, v, runs, w, kp, vp, keep.get(), packed_n);
    }
  });
}

// a shared token row's keys, values and padding copied once per (batch row, pack head): (B, P, S, D | Dv | 1)
template <typename T>
void pack_shared(const Args<T>& a, T* kp, T* vp, bool* pp) {
  const int64_t groups = a.Hq / a.Hkv;
  at::parallel_for(0, a.B * a.P, 1, [&](int64_t begin, int64_t stop) {
    attnzoo_flash::SequentialBlas sequential;
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t b = t / a.P, ph = t % a.P;
      const int64_t kv = a.P == a.Hkv ? ph : ph / groups, lh = a.Hl == 1 ? 0 : ph;
      const int64_t* row = a.blocks + ((a.Bl == 1 ? 0 : b) * a.Hl + lh) * a.S;
      const T* k = a.k + b * a.ks[0] + kv * a.ks[1];
      const T* v = a.v + b * a.vs[0] + kv * a.vs[1];
      for (int64_t c = 0; c < a.S; ++c) {
        const int64_t j = std::min(std::max<int64_t>(row[c], 0), a.Nk - 1);  // -1 slots: hidden by `keep`
        std::copy(k + j * a.ks[2], k + j * a.ks[2] + a.D, kp + (t * a.S + c) * a.D);
        std::copy(v + j * a.vs[2], v + j * a.vs[2] + a.Dv, vp + (t * a.S + c) * a.Dv);
        if (pp) pp[t * a.S + c] = a.pad[b * a.Nk + j];
      }
    }
  });
}

// s (rows x n, row stride lds) = a (rows x D, row stride D) . b (n x D, row stride ldb)^T, in S (T's score type)
inline void score_gemm(int rows, int n, int D, const float* a, const float* b, int ldb, float* s, int lds,
                       std::vector<float>&) {
  gemm('T', n, rows, D, b, ldb, a, D, 0.0f, s, lds);
}
inline void score_gemm(int rows, int n, int D, const double* a, const double* b, int ldb, double* s, int lds,
                       std::vector<double>&) {
  gemm('T', n, rows, D, b, ldb, a, D, 0.0, s, lds);
}
inline void score_gemm(int rows, int n, int D, const c10::BFloat16* a, const c10::BFloat16* b, int ldb, float* s,
                       int lds, std::vector<float>& tmp) {
  if (cblas_gemm_bf16bf16f32) {  // row-major, b transposed
    cblas_gemm_bf16bf16f32(101, 111, 112, rows, n, D, 1.0f, reinterpret_cast<const uint16_t*>(a), D,
                           reinterpret_cast<const uint16_t*>(b), ldb, 0.0f, s, lds);
    return;
  }
  tmp.resize(static_cast<size_t>(rows + n) * D);  // no bf16 GEMM: the same products in float32 (bf16 is exact there)
  for (int64_t i = 0; i < rows * D; ++i) tmp[i] = static_cast<float>(a[i]);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) tmp[(rows + j) * D + d] = static_cast<float>(b[j * ldb + d]);
  gemm('T', n, rows, D, tmp.data() + rows * D, D, tmp.data(), D, 0.0f, s, lds);
}

// log for positive normal floats, vectorisable (Cephes' logf polynomial on the mantissa in [sqrt(1/2), sqrt(2)),
// relative error ~1e-7); double: the library's
__attribute__((always_inline)) inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}
inline double fast_log(double x) { return std::log(x); }

// the sum of n values in 16 lanes, then a tree over the lanes (the vectorised loop's own epilogue was a serial
// chain of scalar adds per block: most of the pass's time with 64-key blocks)
template <typename S>
inline S block_sum(const S* p, int64_t n) {
  S acc[16] = {};
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
#pragma omp simd
    for (int l = 0; l < 16; ++l) acc[l] += p[c + l];
  for (; c < n; ++c) acc[0] += p[c];
  for (int width = 8; width >= 1; width /= 2)
#pragma omp simd
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// block_lse's work: rows [r0, r1) of every query head of KV head kv (batch row b) against the keys up to the
// rows' greatest limit, in chunks of whole key blocks: one GEMM for the scores (S: float, or double for double
// inputs), then per row one pass for the weights exp against the row's reference (its maximum over its first
// chunk, which holds the sink) and per key block their sum; a block whose sum is above e^60 (it may have
// overflowed) or below e^-60 (its maximum is more than ~60 below the reference: weights past float's e^-87 may
// have been flushed to 0) is redone against its own maximum
constexpr double kTiny = 8.75651076269652e-27;  // e^-60

template <typename T, typename S>
void lse_rows(const T* q, const int64_t qs[3], const T* k, const int64_t ks[3], const bool* pad, const int64_t* limit,
              S* out, int64_t b, int64_t kv, int64_t r0, int64_t r1, int64_t G, int64_t Hq, int64_t R, int64_t Nk,
              int64_t D, int64_t block_k, int64_t nkb, S scale, std::vector<T>& qp, std::vector<S>& s,
              std::vector<S>& tmp, std::vector<S>& ref, std::vector<S>& wts, std::vector<S>& sums,
              std::vector<S>& base) {
  const S ninf = -std::numeric_limits<S>::infinity();
  const int64_t nr = r1 - r0, rows = G * nr;
  const int64_t chunk = std::max<int64_t>(1, kBlockK / block_k) * block_k;
  int64_t last = Nk - 1;  // the greatest key any of the rows sees
  if (limit) last = std::min(last, *std::max_element(limit + r0, limit + r1));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < nr; ++r) {
      const T* src = q + b * qs[0] + (kv * G + g) * qs[1] + (r0 + r) * qs[2];
      std::copy(src, src + D, qp.data() + (g * nr + r) * D);
      S* o = out + ((b * Hq + kv * G + g) * R + r0 + r) * nkb;
      std::fill(o, o + nkb, ninf);
    }
  std::fill(ref.begin(), ref.begin() + rows, ninf);
  const T* kh = k + b * ks[0] + kv * ks[1];
  for (int64_t j0 = 0; j0 <= last; j0 += chunk) {
    const int64_t n = std::min(chunk, last + 1 - j0);
    score_gemm(rows, n, D, qp.data(), kh + j0 * ks[2], ks[2], s.data(), chunk, tmp);
    for (int64_t rr = 0; rr < rows; ++rr) {
      const int64_t g = rr / nr, i = r0 + rr % nr;
      const int64_t vis = std::min(n, (limit ? std::min(limit[i], Nk - 1) : Nk - 1) - j0 + 1);
      if (vis <= 0) continue;
      S* sr = s.data() + rr * chunk;
      if (pad)
        for (int64_t c = 0; c < vis; ++c)
          if (!pad[j0 + c]) sr[c] = ninf;
      S m = ref[rr];
      if (m == ninf) {  // the row's first visible keys: its reference
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < vis; ++c) m = sr[c] > m ? sr[c] : m;
        if (m == ninf) continue;
        m *= scale;
        ref[rr] = m;
      }
      const int64_t nb = (vis + block_k - 1) / block_k;
      S* w = wts.data();  // the weights exp(x - m), then per block their sum
#pragma omp simd
      for (int64_t c = 0; c < vis; ++c) w[c] = fast_exp(sr[c] * scale - m);
      for (int64_t bb = 0; bb < nb; ++bb) {
        const int64_t c0 = bb * block_k, c1 = std::min(vis, c0 + block_k);
        S sum = block_sum(w + c0, c1 - c0);
        base[bb] = m;
        if (!(sum >= S(kTiny) && sum <= S(1 / kTiny))) {  // far below or above the reference: against its own max
          S mx = ninf;
          for (int64_t c = c0; c < c1; ++c) mx = std::max(mx, sr[c] * scale);
          sum = 1, base[bb] = mx;
          if (mx > ninf) {
            sum = 0;
            for (int64_t c = c0; c < c1; ++c) sum += fast_exp(sr[c] * scale - mx);
          }
        }
        sums[bb] = sum;
      }
      S* o = out + ((b * Hq + kv * G + g) * R + i) * nkb + j0 / block_k;
#pragma omp simd
      for (int64_t bb = 0; bb < nb; ++bb) o[bb] = base[bb] + fast_log(sums[bb]);
    }
  }
}

// block_select's row: the key blocks one selecting head keeps for one query block, ascending, into `out` (S
// slots, -1 after). `s` points at the row of the group's first query head (G rows, `stride` apart, nkb scores
// each, -inf: not visible). Ranked by the group's best score (by_max; one head: its own score), else by the
// mean over the group's heads of each head's softmax over its visible blocks; the `count` best blocks any head
// sees (ties: the lower index), block 0 if any head sees it (sink), and blocks [lo, hi] are kept.
template <typename T>
void select_row(const T* s, int64_t stride, int64_t G, int64_t nkb, int64_t count, bool by_max, bool sink,
                int64_t lo, int64_t hi, std::vector<T>& rank, std::vector<int64_t>& order, std::vector<uint8_t>& keep,
                int64_t* out, int64_t S) {
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill(rank.begin(), rank.begin() + nkb, ninf);
  if (by_max || G == 1) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < nkb; ++j) rank[j] = std::max(rank[j], s[g * stride + j]);
  } else {  // a block any head sees ranks by its mean mass (>= 0), the others stay -inf
    for (int64_t g = 0; g < G; ++g) {
      const T* sg = s + g * stride;
      T m = ninf;
      for (int64_t j = 0; j < nkb; ++j) m = std::max(m, sg[j]);
      if (m == ninf) continue;
      T l = 0;
#pragma omp simd reduction(+ : l)
      for (int64_t j = 0; j < nkb; ++j) l += fast_exp(sg[j] - m);
      const T w = T(1) / (l * T(G));
      for (int64_t j = 0; j < nkb; ++j)
        if (sg[j] > ninf) rank[j] = (rank[j] > ninf ? rank[j] : T(0)) + fast_exp(sg[j] - m) * w;
    }
  }
  std::fill(keep.begin(), keep.begin() + nkb, uint8_t(0));
  int64_t n = 0;
  for (int64_t j = 0; j < nkb; ++j)
    if (rank[j] > ninf) order[n++] = j;
  const int64_t c = std::min(count, n);
  if (c > 0 && c < n)
    std::nth_element(order.begin(), order.begin() + (c - 1), order.begin() + n, [&](int64_t a, int64_t b) {
      return rank[a] > rank[b] || (rank[a] == rank[b] && a < b);
    });
  for (int64_t i = 0; i < c; ++i) keep[order[i]] = 1;
  if (sink && nkb > 0 && rank[0] > ninf) keep[0] = 1;
  for (int64_t j = std::max<int64_t>(lo, 0); j <= std::min(hi, nkb - 1); ++j) keep[j] = 1;
  int64_t w = 0;
  for (int64_t j = 0; j < nkb && w < S; ++j)
    if (keep[j]) out[w++] = j;
  std::fill(out + w, out + S, int64_t(-1));
}

}  // namespace

// lse (B, Hq, R, ceil(Nk / block_k)): for each row of q (B, Hq, R, D) and each key block of block_k keys of
// k (B, Hkv, Nk, D), log Σ exp(scale · q·k_j) over the block's keys j the row sees: j <= limit[r] (limit (R,)
// int64, or empty: every key) and not hidden by pad (B, Nk) bool; -inf where it sees none. float32/float64 in and
// out, or bfloat16 in (MKL's bf16 GEMM) and float32 out. block_topk's score="lse" (each query block's mean row):
// one GEMM per chunk of keys and one pass over its scores, parallel over (batch row, KV head, rows), the KV head's
// query heads in one GEMM operand
at::Tensor block_lse(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& pad,
                     const std::optional<at::Tensor>& limit, int64_t block_k, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1 && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && q.scalar_type() == k.scalar_type() && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0 && block_k > 0,
              "block_lse: q (B, Hq, R, D), k (B, Hkv, Nk, D) alike, unit last strides, Hq a multiple of Hkv");
  const int64_t B = q.size(0), Hq = q.size(1), R = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const int64_t nkb = (Nk + block_k - 1) / block_k, G = Hq / Hkv;
  const bool* pp = nullptr;
  if (pad.has_value() && pad->defined()) {
    TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 && pad->size(0) == B &&
                    pad->size(1) == Nk, "block_lse: pad (B, Nk) bool");
    pp = pad->data_ptr<bool>();
  }
  const int64_t* lim = nullptr;
  if (limit.has_value() && limit->defined()) {
    TORCH_CHECK(limit->scalar_type() == at::kLong && limit->is_contiguous() && limit->dim() == 1 &&
                    limit->size(0) == R, "block_lse: limit (R,) int64");
    lim = limit->data_ptr<int64_t>();
  }
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  auto out = at::empty({B, Hq, R, nkb}, q.options().dtype(bf16 ? at::kFloat : q.scalar_type()));
  if (out.numel() == 0) return out;
  const int64_t rows_per = std::max<int64_t>(1, kRows / G);  // rows per work item and head
  const int64_t chunks = (R + rows_per - 1) / rows_per, chunk = std::max<int64_t>(1, kBlockK / block_k) * block_k;
  auto go = [&](auto* qd, auto* kd, auto* od) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(qd)>>;
    using S = std::remove_pointer_t<decltype(od)>;
    int64_t qs[3], ks[3];
    attnzoo_flash::operand_strides(q, D, qs, "block_lse", "q");
    attnzoo_flash::operand_strides(k, D, ks, "block_lse", "k");
    at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t stop) {
      attnzoo_flash::SequentialBlas sequential;
      std::vector<T> qp(G * rows_per * D);
      std::vector<S> s(G * rows_per * chunk), tmp, ref(G * rows_per), wts(chunk), sums(chunk), base(chunk);
      for (int64_t t = begin; t < stop; ++t) {
        const int64_t b = t / (Hkv * chunks), kv = (t / chunks) % Hkv, c = t % chunks;
        const int64_t r0 = c * rows_per, r1 = std::min(R, r0 + rows_per);
        lse_rows<T, S>(qd, qs, kd, ks, pp ? pp + b * Nk : nullptr, lim, od, b, kv, r0, r1, G, Hq, R, Nk, D, block_k,
                       nkb, static_cast<S>(scale), qp, s, tmp, ref, wts, sums, base);
      }
    });
  };
  if (bf16) {
    go(q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), out.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_lse", [&] {
      go(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
  }
  return out;
}

// blocks (B, Hs, nq, S) int64: block_topk's selection from its pooled scores (B, Hq, nq, nkb) (float32/64,
// -inf where a query block sees no key of the block) for Hs = `heads` selecting heads (each the Hq / Hs query
// heads of a group): per row the `count` best blocks (select_row), block 0 with `sink`, and the blocks [lo[i],
// hi[i]] of query block i (lo, hi (nq,) int64, or empty: none; the causal diagonal), ascending, -1 padded to
// S = the most a row can keep
at::Tensor block_select(const at::Tensor& scores, int64_t heads, int64_t count, bool by_max, bool sink,
                        const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& hi) {
  TORCH_CHECK(scores.dim() == 4 && scores.is_contiguous() && heads > 0 && scores.size(1) % heads == 0 && count >= 0,
              "block_select: scores (B, Hq, nq, nkb) contiguous, Hq a multiple of heads, count >= 0");
  const int64_t B = scores.size(0), Hq = scores.size(1), nq = scores.size(2), nkb = scores.size(3);
  const int64_t G = Hq / heads;
  const bool diag = lo.has_value() && lo->defined();
  TORCH_CHECK(!diag || (hi.has_value() && hi->defined() && lo->scalar_type() == at::kLong &&
                        hi->scalar_type() == at::kLong && lo->is_contiguous() && hi->is_contiguous() &&
                        lo->numel() == nq && hi->numel() == nq),
              "block_select: lo and hi (nq,) int64 together");
  const int64_t* lp = diag ? lo->data_ptr<int64_t>() : nullptr;
  const int64_t* hp = diag ? hi->data_ptr<int64_t>() : nullptr;
  int64_t width = 0;
  for (int64_t i = 0; diag && i < nq; ++i)
    width = std::max(width, std::min(hp[i], nkb - 1) - std::max<int64_t>(lp[i], 0) + 1);
  const int64_t S = std::min(nkb, std::min(count, nkb) + (sink ? 1 : 0) + width);
  auto out = at::empty({B, heads, nq, S}, scores.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "block_select", [&] {
    const scalar_t* sd = scores.data_ptr<scalar_t>();
    int64_t* od = out.data_ptr<int64_t>();
    at::parallel_for(0, B * heads * nq, 16, [&](int64_t begin, int64_t stop) {
      std::vector<scalar_t> rank(nkb);
      std::vector<int64_t> order(nkb);
      std::vector<uint8_t> keep(nkb);
      for (int64_t t = begin; t < stop; ++t) {
        const int64_t b = t / (heads * nq), h = (t / nq) % heads, i = t % nq;
        select_row<scalar_t>(sd + ((b * Hq + h * G) * nq + i) * nkb, nq * nkb, G, nkb, count, by_max, sink,
                             diag ? lp[i] : 0, diag ? hp[i] : -1, rank, order, keep, od + t * S, S);
      }
    });
  });
  return out;
}

// returns out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) in q's dtype (float32 or float64)
std::vector<at::Tensor> blocksparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& blocks, const std::optional<at::Tensor>& pad,
                                              int64_t block_q, int64_t block_k, int64_t heads, double scale,
                                              bool causal, int64_t offset, const std::optional<at::Tensor>& bias,
                                              int64_t bias_lo, double cap, const std::optional<at::Tensor>& skip,
                                              int64_t skip_block_k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && blocks.dim() == 4, "blocksparse_attention: 4-D");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "blocksparse_attention: unit last strides");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "blocksparse_attention: dtypes");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.is_contiguous(), "blocksparse_attention: blocks");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const int64_t Dv = v.size(3);
  TORCH_CHECK(Hq % Hkv == 0 && Hq % heads == 0 && (Hq / Hkv) % heads == 0, "blocksparse_attention: heads");
  const int64_t nqb = (Nq + block_q - 1) / block_q;
  TORCH_CHECK(blocks.size(2) == nqb || blocks.size(2) == 1, "blocksparse_attention: query blocks");
  const bool has_skip = skip.has_value() && skip->defined();
  TORCH_CHECK(!has_skip || (skip->scalar_type() == at::kLong && skip->is_contiguous() && skip->dim() == 4 &&
                            skip->size(2) == nqb && skip_block_k > 0),
              "blocksparse_attention: skip (Bs, Hs, query blocks, S2) int64 with skip_block_k > 0");
  auto out = at::empty({B, Hq, Nq, Dv}, q.options());
  auto lse = at::empty({B, Hq, Nq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "blocksparse_attention", [&] {
    Args<scalar_t> a{};
    a.q = q.data_ptr<scalar_t>();
    a.k = k.data_ptr<scalar_t>();
    a.v = v.data_ptr<scalar_t>();
    a.blocks = blocks.data_ptr<int64_t>();
    a.pad = nullptr;
    if (pad.has_value() && pad->defined()) {
      TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 && pad->size(0) == B &&
                      pad->size(1) == Nk, "blocksparse_attention: pad (B, Nk) bool");
      a.pad = pad->data_ptr<bool>();
    }
    a.bias = nullptr;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->scalar_type() == q.scalar_type() && bias->is_contiguous() && bias->dim() == 2 &&
                      (bias->size(0) == 1 || bias->size(0) == Hq) && bias_lo <= 1 - Nk && bias_lo + bias->size(1) >= Nq,
                  "blocksparse_attention: bias (1 or Hq, L) in q's dtype covering the distances [1 - Nk, Nq - 1]");
      a.bias = bias->data_ptr<scalar_t>();
      a.bias_rows = bias->size(0), a.bias_len = bias->size(1), a.bias_lo = bias_lo;
    }
    a.out = out.data_ptr<scalar_t>();
    a.lse = lse.data_ptr<scalar_t>();
    a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.Nq = Nq, a.Nk = Nk, a.D = D, a.Dv = Dv;
    attnzoo_flash::operand_strides(q, D, a.qs, "blocksparse_attention", "q");
    attnzoo_flash::operand_strides(k, D, a.ks, "blocksparse_attention", "k");
    attnzoo_flash::operand_strides(v, Dv, a.vs, "blocksparse_attention", "v");
    attnzoo_flash::operand_strides(out, Dv, a.os, "blocksparse_attention", "out");
    a.Bl = blocks.size(0), a.Hl = blocks.size(1), a.nqb = nqb, a.S = blocks.size(3);
    a.shared = blocks.size(2) == 1 && nqb > 1;
    a.block_q = block_q, a.block_k = block_k, a.heads = heads;
    a.skip = has_skip ? skip->data_ptr<int64_t>() : nullptr;
    a.Bs = has_skip ? skip->size(0) : 1, a.Hs = has_skip ? skip->size(1) : 1, a.S2 = has_skip ? skip->size(3) : 0;
    a.skip_bk = has_skip ? skip_block_k : 1;
    a.kp = a.vp = nullptr;
    a.pp = nullptr;
    at::Tensor kp, vp, pp;
    if (a.shared && block_k == 1 && !a.bias && B > 0 && Nk > 0) {  // shared tokens: packed once, read whole in place
      a.P = a.Hl == Hq ? Hq : Hkv;
      kp = at::empty({B * a.P * a.S * D}, q.options());
      vp = at::empty({B * a.P * a.S * Dv}, q.options());
      if (a.pad) pp = at::empty({B * a.P * a.S}, q.options().dtype(at::kBool));
      a.kp = kp.data_ptr<scalar_t>();
      a.vp = vp.data_ptr<scalar_t>();
      a.pp = a.pad ? pp.data_ptr<bool>() : nullptr;
      pack_shared(a, kp.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>(), a.pp ? pp.data_ptr<bool>() : nullptr);
    }
    a.scale = static_cast<scalar_t>(scale);
    a.cap = static_cast<scalar_t>(cap);
    a.causal = causal;
    a.offset = offset;
    if (Nq > 0 && B > 0) run(a);
  });
  return {out, lse};
}

TORCH_LIBRARY(attnzoo_blocksparse, m) {
  m.def("blocksparse_attention", &blocksparse_attention);
  m.def("block_lse", &block_lse);
  m.def("block_select", &block_select);
}
