// The backward pass of a banded block layout (attnzoo.core.fused.attend_band_backward): FlashAttention-2's
// recomputing backward over each query block's one contiguous key window; and of exact attention
// (attnzoo.core.fused.attend_exact_backward), whose query blocks read keys [0, Nk), causal or not.
//
// dq, dk, dv = gradients of (out, lse) of softmax(q k^T * scale restricted to the band) v, recomputed from the
//   saved lse, given d_out and d_lse (optional), where
//   q, out, d_out (B, Hq, Nq, D|Dv), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): any strides with a unit last one;
//   lse, d_lse (B, Hq, Nq) contiguous (lse -inf where a row saw no key: its probabilities are 0);
//   query block i (rows i*block ...) reads the window of L keys from key (i + start) * block, under the element
//   mask masks[mask_of[i]] (M, block, L) bool (keys outside [0, Nk) are masked there) (mode kBand);
//   or (mode kPrefix) every query block reads keys from 0, row p of block i those up to its causal limit
//   i * block + p + offset (offset = the query positions' shift against the keys', e.g. Nk - Nq), or (mode kFull)
//   all Nk keys: one window of L = Nk columns that are the keys, no masks read (masks, mask_of, start unused);
//   pad (B, Nk) bool or empty: False hides a key;
//   a score mod: a distance bias added to the scaled score, then cap > 0
//   (0: none), the soft cap cap * tanh(x / cap) of that sum; lse is of the modified scores. The bias is empty or
//   (Hb, block + L - 1) (Hb = Hq or 1) in mode kBand, read at bias[h, c - r + block - 1] for window column c of
//   block row r (the distance kv - q is the same function of c - r in every block), and (Hb, Nq + Nk - 1) in
//   modes kPrefix / kFull, read at bias[h, c - pos + Nq - 1] for key c of query position pos (distances from
//   -(Nq - 1) - offset). With bias_grad, d_bias (Hb, bias length) is the gradient of the biased scores summed per
//   head row and bias index (the caller pulls it back to the bias's own tensors: a learned table).
// Per tile of query rows (a run of positions of one block, for every query head of a KV head's group, so the
// rows share one column range) and chunk of window columns:
//   delta = rowsum(dO * out) - d_lse (while packing the rows), S = (q*scale) k^T (+ bias, capped), P = exp(S - lse)
//   (0 where masked), dV += P^T dO, dP = dO v^T, dS = P (dP - delta) (times the cap's slope 1 - tanh^2),
//   dQ += dS k * scale, dK += dS^T (q*scale): five GEMMs, no (Nq, Nk) intermediate.
// Work item: (batch row, KV head, chunk of query blocks). A KV head's query blocks are split into chunks only
// when there are fewer than kMinItems (batch, KV head) pairs; then each chunk accumulates dK/dV of the keys it
// reads in its own buffer, added up after in chunk order (no races, no atomics). dQ: each query block has one
// window, so every row's gradient is written once.
// Deterministic for any thread count: the work items depend on the shapes only, each runs on one thread with
// single-threaded BLAS (MKL would otherwise thread each small GEMM itself, differently once
// torch.set_num_threads has switched its dynamic mode off), so the arithmetic and its order are fixed. Built
// with -fopenmp (core/cpp.py) so at::parallel_for really runs the items on torch's threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "flash_common.h"

namespace {

using attnzoo_flash::fast_exp;
using attnzoo_flash::gemm;
using attnzoo_flash::gemm_nt;
using attnzoo_flash::SequentialBlas;

constexpr int64_t kCols = 512;  // window columns per score chunk
enum Mode : int64_t { kBand = 0, kPrefix = 1, kFull = 2 };
constexpr int64_t kMinItems = 8;  // fewer (batch, KV head) pairs than this: their query blocks split in chunks

template <typename T>
struct Args {
  const T *q, *k, *v, *out, *dout, *lse, *dlse;  // dlse: nullptr when none
  const bool *masks, *pad;
  const int64_t* mask_of;
  const int32_t* lo;  // (M, block): each mask row's first visible column (L when none)
  const int32_t* hi;  // (M, block): one past its last
  const bool* dense;  // (M, block): every column of [lo, hi) visible (a window: no mask reads)
  const T* bias;      // (Hb, bias_len) or nullptr
  int64_t bias_heads, bias_len;  // Hb, block + L - 1 (kBand) or Nq + Nk - 1
  T cap;               // 0: none
  T *dq, *dk, *dv;
  T* dbias;  // bias_grad: each work item's (bias_rows, bias_len) sums of dS per bias index, or nullptr
  int64_t bias_rows;  // G (a row per query head of the item's group) or 1 (a shared bias)
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv, block, start, L, nqb;
  int64_t mode, offset;  // Mode; kPrefix: row position pos sees keys [0, pos + offset]
  int64_t tile;  // query positions per tile (times the group's heads: the tile's rows)
  int64_t qs[3], ks[3], vs[3], os[3], dos[3];
  T scale;
};

// per-thread tiles: packed scaled queries and output gradients, the rows' lse and delta, scores / probabilities,
// their gradients, the soft cap's slopes (empty without a cap) and the tile's dQ
template <typename T>
struct Scratch {
  std::vector<T> qp, gp, lse, delta, p, ds, slope, dq;
  Scratch(int64_t rows, int64_t D, int64_t Dv, bool cap)
      : qp(rows * D), gp(rows * Dv), lse(rows), delta(rows), p(rows * kCols), ds(rows * kCols),
        slope(cap ? rows * kCols : 0), dq(rows * D) {}
};

// the visible window columns [lo, hi) of row p of query block i, whether each of them is visible (no mask reads),
// and its element mask row (kBand; nullptr otherwise)
struct RowRun {
  int64_t lo, hi;
  bool dense;
  const bool* mask;
};

template <typename T>
inline RowRun row_run(const Args<T>& a, int64_t i, int64_t p) {
  if (a.mode == kBand) {
    const int64_t e = a.mask_of[i] * a.block + p;
    return {a.lo[e], a.hi[e], a.dense[e], a.masks + e * a.L};
  }
  const int64_t hi = a.mode == kFull ? a.Nk : std::clamp<int64_t>(i * a.block + p + a.offset + 1, 0, a.Nk);
  return {0, hi, true, nullptr};
}

// the bias index of window column 0 of row p of query block i (column c: + c)
template <typename T>
inline int64_t bias_base(const Args<T>& a, int64_t i, int64_t p) {
  return a.mode == kBand ? a.block - 1 - p : a.Nq - 1 - i * a.block - p;
}

// a row's columns [lo, hi) of scaled scores s in place: + the distance bias br (BIAS), then the soft cap
// cap * tanh(x / cap) (CAP; written as cap + cap * u with u = tanh - 1 = -2 / (exp(2x / cap) + 1), and the
// slope 1 - tanh^2 = -u (2 + u) into sl, both exact near saturation). One vectorised pass.
template <typename T, bool BIAS, bool CAP>
inline void modify_pass(T* s, const T* br, T* sl, int64_t lo, int64_t hi, T cap) {
  const T two_over_cap = CAP ? T(2) / cap : T(0);
#pragma omp simd
  for (int64_t c = lo; c < hi; ++c)
    s[c] = attnzoo_flash::modified_score<T, BIAS, CAP>(s[c], br, sl, c, cap, two_over_cap);
}

template <typename T>
inline void modify(T* s, const T* br, T* sl, int64_t lo, int64_t hi, T cap) {
  if (br && cap > 0) modify_pass<T, true, true>(s, br, sl, lo, hi, cap);
  else if (br) modify_pass<T, true, false>(s, br, sl, lo, hi, cap);
  else if (cap > 0) modify_pass<T, false, true>(s, br, sl, lo, hi, cap);
}

// query blocks [i0, i1) of KV head h in batch row b; dK/dV of keys [key_base, ...) go to dk/dv (row strides D, Dv)
// (bias_grad) the rows' dS summed per bias index into db (bias_rows, bias_len)
template <typename T>
void item(const Args<T>& a, int64_t b, int64_t h, int64_t i0, int64_t i1, T* dk, T* dv, int64_t key_base,
          T* db, Scratch<T>& w) {
  const int64_t G = a.Hq / a.Hkv;
  const T* k = a.k + b * a.ks[0] + h * a.ks[1];
  const T* v = a.v + b * a.vs[0] + h * a.vs[1];
  const bool* pad = a.pad ? a.pad + b * a.Nk : nullptr;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t key0 = a.mode == kBand ? (i + a.start) * a.block : 0;
    const int64_t nrow = std::min(a.block, a.Nq - i * a.block);
    for (int64_t p0 = 0; p0 < nrow; p0 += a.tile) {
      const int64_t p1 = std::min(nrow, p0 + a.tile), np = p1 - p0, rows = G * np;
      int64_t c_lo = a.L, c_hi = 0;  // the window columns the tile's rows see
      for (int64_t p = p0; p < p1; ++p) {
        const RowRun run = row_run(a, i, p);
        if (run.lo < run.hi) c_lo = std::min(c_lo, run.lo), c_hi = std::max(c_hi, run.hi);
      }
      c_hi = std::max(c_hi, c_lo);  // rows that see nothing: no column chunk, their dQ is written as 0
      // pack the tile's rows: row g * np + (p - p0) is query head h * G + g at position i * block + p
      for (int64_t g = 0; g < G; ++g)
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t r = g * np + p - p0, hq = h * G + g, pos = i * a.block + p;
          attnzoo_flash::pack_grad_row(a, b, hq, pos, w.qp.data() + r * a.D, w.gp.data() + r * a.Dv, w.lse[r],
                                       w.delta[r]);
        }
      std::fill(w.dq.begin(), w.dq.begin() + rows * a.D, T(0));
      for (int64_t c0 = c_lo; c0 < c_hi; c0 += kCols) {
        const int64_t n = std::min(kCols, c_hi - c0), j0 = key0 + c0;
        const T* kc = k + j0 * a.ks[2];
        const T* vc = v + j0 * a.vs[2];
        // S (rows x n, row stride kCols) = qp . kc^T, then P in place
        gemm('T', n, rows, a.D, kc, a.ks[2], w.qp.data(), a.D, T(0), w.p.data(), kCols);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = p0 + r % np;
          T* pr = w.p.data() + r * kCols;
          const RowRun run = row_run(a, i, p);
          const int64_t lo = std::max<int64_t>(run.lo - c0, 0);
          const int64_t hi = std::min<int64_t>(run.hi - c0, n);
          const T l = w.lse[r];
          if (lo >= hi || l == -std::numeric_limits<T>::infinity()) {
            std::fill(pr, pr + n, T(0));
            continue;
          }
          if (a.bias || a.cap > 0) {
            // bias index of column c0 + c: c0 + c - p + block - 1 (kBand: row p's distances), else
            // c0 + c - pos + Nq - 1 (key c0 + c of position pos = i * block + p)
            const T* br = a.bias ? a.bias + (a.bias_heads > 1 ? h * G + r / np : 0) * a.bias_len +
                                       bias_base(a, i, p) + c0
                                 : nullptr;
            modify(pr, br, a.cap > 0 ? w.slope.data() + r * kCols : nullptr, lo, hi, a.cap);
          }
          // exp of every score of the run, times the mask as 0/1 (branch-free, so the loop vectorises; a hidden
          // score's exp is finite: fast_exp clamps)
          const bool* mr = run.mask ? run.mask + c0 : nullptr;
          const bool* pc = pad ? pad + j0 : nullptr;
          std::fill(pr, pr + lo, T(0));
          if (pc && run.dense) {
#pragma omp simd
            for (int64_t c = lo; c < hi; ++c) pr[c] = fast_exp(pr[c] - l) * T(pc[c]);
          } else if (pc) {
#pragma omp simd
            for (int64_t c = lo; c < hi; ++c) pr[c] = fast_exp(pr[c] - l) * T(mr[c] & pc[c]);
          } else if (run.dense) {
#pragma omp simd
            for (int64_t c = lo; c < hi; ++c) pr[c] = fast_exp(pr[c] - l);
          } else {
#pragma omp simd
            for (int64_t c = lo; c < hi; ++c) pr[c] = fast_exp(pr[c] - l) * T(mr[c]);
          }
          std::fill(pr + hi, pr + n, T(0));
        }
        T* dkc = dk + (j0 - key_base) * a.D;
        T* dvc = dv + (j0 - key_base) * a.Dv;
        // dV (n x Dv, row-major) += P^T dO: column-major dV^T (Dv x n) += dO^T (Dv x rows) . P (rows x n)
        gemm_nt(a.Dv, n, rows, w.gp.data(), a.Dv, w.p.data(), kCols, dvc, a.Dv);
        // dP (rows x n) = dO . vc^T, then dS = P (dP - delta) in place
        gemm('T', n, rows, a.Dv, vc, a.vs[2], w.gp.data(), a.Dv, T(0), w.ds.data(), kCols);
        for (int64_t r = 0; r < rows; ++r) {
          // with a cap: times its slope (the capped score's gradient to the biased one)
          T* sr = w.ds.data() + r * kCols;
          attnzoo_flash::grad_scores(sr, w.p.data() + r * kCols, a.cap > 0 ? w.slope.data() + r * kCols : nullptr,
                                     w.delta[r], n);
          if (db) {  // every column of the chunk: dS is 0 where P is (and the indices stay inside the bias)
            T* dst = db + (a.bias_rows > 1 ? r / np : 0) * a.bias_len + bias_base(a, i, p0 + r % np) + c0;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) dst[c] += sr[c];
          }
        }
        // dQ (rows x D) += dS . kc: column-major dQ^T (D x rows) += kc^T (D x n) . dS^T (n x rows)
        gemm('N', a.D, rows, n, kc, a.ks[2], w.ds.data(), kCols, T(1), w.dq.data(), a.D);
        // dK (n x D) += dS^T qp (q already scaled)
        gemm_nt(a.D, n, rows, w.qp.data(), a.D, w.ds.data(), kCols, dkc, a.D);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t r = g * np + p - p0, hq = h * G + g, pos = i * a.block + p;
          T* dst = a.dq + ((b * a.Hq + hq) * a.Nq + pos) * a.D;
          for (int64_t d = 0; d < a.D; ++d) dst[d] = w.dq[r * a.D + d] * a.scale;
        }
    }
  }
}

// the keys query blocks [i0, i1) may read: [first, last) within [0, Nk)
template <typename T>
inline std::pair<int64_t, int64_t> key_span(const Args<T>& a, int64_t i0, int64_t i1) {
  if (a.mode == kPrefix) return {0, std::clamp<int64_t>(std::min(i1 * a.block, a.Nq) + a.offset, 0, a.Nk)};
  if (a.mode == kFull) return {0, a.Nk};
  return {std::clamp<int64_t>((i0 + a.start) * a.block, 0, a.Nk),
          std::clamp<int64_t>((i1 - 1 + a.start) * a.block + a.L, 0, a.Nk)};
}

// runs of query blocks per (batch row, KV head): shapes only, never threads
inline int64_t chunks_per_pair(int64_t pairs, int64_t nqb) {
  return std::min<int64_t>(nqb, (kMinItems + pairs - 1) / pairs);
}

template <typename T>
void run(const Args<T>& a) {
  const int64_t pairs = a.B * a.Hkv, G = a.Hq / a.Hkv;
  const int64_t chunks = chunks_per_pair(pairs, a.nqb);
  const int64_t db_size = a.bias_rows * a.bias_len;  // each item's d_bias sums
  const int64_t per = (a.nqb + chunks - 1) / chunks;
  const int64_t rows = G * std::min(a.tile, a.block);
  if (chunks == 1) {  // one item per (batch row, KV head): it owns that head's dK/dV
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t stop) {
      SequentialBlas sequential;
      Scratch<T> w(rows, a.D, a.Dv, a.cap > 0);
      for (int64_t t = begin; t < stop; ++t)
        item(a, t / a.Hkv, t % a.Hkv, 0, a.nqb, a.dk + t * a.Nk * a.D, a.dv + t * a.Nk * a.Dv, 0,
             a.dbias ? a.dbias + t * db_size : nullptr, w);
    });
    return;
  }
  // several chunks per head: each accumulates the keys it reads in its own buffer, added up below
  std::vector<std::vector<T>> dk_part(pairs * chunks), dv_part(pairs * chunks);
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t stop) {
    SequentialBlas sequential;
    Scratch<T> w(rows, a.D, a.Dv, a.cap > 0);
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t pair = t / chunks, c = t % chunks, i0 = c * per, i1 = std::min(a.nqb, i0 + per);
      if (i0 >= i1) continue;
      const auto span = key_span(a, i0, i1);
      dk_part[t].assign((span.second - span.first) * a.D, T(0));
      dv_part[t].assign((span.second - span.first) * a.Dv, T(0));
      item(a, pair / a.Hkv, pair % a.Hkv, i0, i1, dk_part[t].data(), dv_part[t].data(), span.first,
           a.dbias ? a.dbias + t * db_size : nullptr, w);
    }
  });
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t pair = begin; pair < stop; ++pair)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i0 = c * per, i1 = std::min(a.nqb, i0 + per);
        if (i0 >= i1) continue;
        const int64_t first = key_span(a, i0, i1).first;
        const std::vector<T>& pk = dk_part[pair * chunks + c];
        const std::vector<T>& pv = dv_part[pair * chunks + c];
        T* dk = a.dk + (pair * a.Nk + first) * a.D;
        T* dv = a.dv + (pair * a.Nk + first) * a.Dv;
        for (size_t e = 0; e < pk.size(); ++e) dk[e] += pk[e];
        for (size_t e = 0; e < pv.size(); ++e) dv[e] += pv[e];
      }
  });
}

}  // namespace

// returns dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv), contiguous, in q's dtype (float32/64)
std::vector<at::Tensor> band_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& d_out, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& d_lse,
                                      const at::Tensor& masks, const at::Tensor& mask_of,
                                      const std::optional<at::Tensor>& pad, int64_t block, int64_t start,
                                      double scale, int64_t tile, const std::optional<at::Tensor>& bias,
                                      double cap, int64_t mode, int64_t offset, bool bias_grad) {
  const char* op = "band_backward";
  attnzoo_flash::check_backward_operands(op, q, k, v, out, d_out, lse, d_lse);
  const auto dtype = q.scalar_type();
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(tile > 0 && cap >= 0 && block > 0, op, ": tile > 0, block > 0, cap >= 0");
  TORCH_CHECK(mode == kBand || mode == kPrefix || mode == kFull, op, ": mode 0 (band), 1 (causal prefix) or 2 (full)");
  const bool band = mode == kBand;
  const int64_t nqb = (Nq + block - 1) / block;
  int64_t L = Nk, M = 0;
  const int64_t* mo = nullptr;
  const bool* mk = nullptr;
  // kBand: each mask row's visible column run [lo, hi), checked to stay inside the keys
  std::vector<int32_t> lo, hi;
  std::unique_ptr<bool[]> dense;
  if (band) {
    TORCH_CHECK(masks.scalar_type() == at::kBool && masks.is_contiguous() && masks.dim() == 3 &&
                    masks.size(1) == block, op, ": masks (M, block, L) bool");
    L = masks.size(2), M = masks.size(0);
    TORCH_CHECK(mask_of.scalar_type() == at::kLong && mask_of.is_contiguous() && mask_of.numel() == nqb, op,
                ": mask_of (n_q_blocks,) int64");
    mo = mask_of.data_ptr<int64_t>();
    for (int64_t i = 0; i < nqb; ++i) TORCH_CHECK(mo[i] >= 0 && mo[i] < M, op, ": mask_of out of range");
    lo.resize(M * block), hi.resize(M * block), dense.reset(new bool[M * block]);
    mk = masks.data_ptr<bool>();
    for (int64_t e = 0; e < M * block; ++e) {
      int64_t first = L, last = 0, seen = 0;
      for (int64_t c = 0; c < L; ++c)
        if (mk[e * L + c]) first = std::min(first, c), last = c + 1, ++seen;
      lo[e] = static_cast<int32_t>(first), hi[e] = static_cast<int32_t>(last);
      dense[e] = seen == last - first;
    }
    for (int64_t i = 0; i < nqb; ++i)
      for (int64_t p = 0; p < std::min(block, Nq - i * block); ++p) {
        const int64_t e = mo[i] * block + p;
        TORCH_CHECK(lo[e] >= hi[e] || ((i + start) * block + lo[e] >= 0 && (i + start) * block + hi[e] <= Nk), op,
                    ": a mask shows a key outside [0, Nk)");
      }
  }
  const auto grads = attnzoo_flash::backward_grads(q, k, v);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!bias_grad || has_bias, op, ": bias_grad without a bias");
  const int64_t G = Hkv > 0 ? Hq / Hkv : 1, Hb = has_bias ? bias->size(0) : 0;
  const int64_t items = B * Hkv * chunks_per_pair(std::max<int64_t>(B * Hkv, 1), std::max<int64_t>(nqb, 1));
  const int64_t bias_len = band ? block + L - 1 : Nq + Nk - 1, bias_rows = Hb > 1 ? G : 1;
  auto dbias_parts = bias_grad ? at::zeros({items, bias_rows, bias_len}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "band_backward", [&] {
    Args<scalar_t> a{};
    attnzoo_flash::backward_operands<scalar_t>(a, op, q, k, v, out, d_out, lse, d_lse, pad, grads);
    a.masks = mk, a.mask_of = mo, a.lo = lo.data(), a.hi = hi.data(), a.dense = dense.get();
    a.mode = mode, a.offset = offset;
    a.bias = nullptr, a.bias_heads = 0, a.bias_len = bias_len;
    a.cap = static_cast<scalar_t>(cap);
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->dim() == 2 &&
                      (bias->size(0) == 1 || bias->size(0) == Hq) && bias->size(1) == a.bias_len, op,
                  ": bias (1 or Hq, block + L - 1 (band) or Nq + Nk - 1) contiguous, q's dtype");
      a.bias = bias->data_ptr<scalar_t>(), a.bias_heads = bias->size(0);
    }
    a.dbias = bias_grad ? dbias_parts.data_ptr<scalar_t>() : nullptr, a.bias_rows = bias_rows;
    a.block = block, a.start = start, a.L = L, a.nqb = nqb;
    a.scale = static_cast<scalar_t>(scale);
    a.tile = tile;
    if (B > 0 && Nq > 0 && Hq > 0) run(a);
  });
  if (!bias_grad) return {grads[0], grads[1], grads[2], at::Tensor()};
  // the items' sums added up per head row in item order (fixed by the shapes): items (batch row, KV head, run)
  // in that order, each with a row per query head of the group (or one shared row)
  auto d_bias = at::zeros({Hb, bias_len}, q.options());
  const int64_t per_pair = items / std::max<int64_t>(B * Hkv, 1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "band_backward_bias", [&] {
    const scalar_t* parts = dbias_parts.data_ptr<scalar_t>();
    scalar_t* out = d_bias.data_ptr<scalar_t>();
    for (int64_t t = 0; t < items; ++t)
      for (int64_t g = 0; g < bias_rows; ++g) {
        scalar_t* dst = out + (Hb > 1 ? (t / per_pair % Hkv) * G + g : 0) * bias_len;
        const scalar_t* src = parts + (t * bias_rows + g) * bias_len;
        for (int64_t e = 0; e < bias_len; ++e) dst[e] += src[e];
      }
  });
  return {grads[0], grads[1], grads[2], d_bias};
}

TORCH_LIBRARY(attnzoo_band, m) { m.def("band_backward", &band_backward); }
