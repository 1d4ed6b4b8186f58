// The backward pass of a layout the block kernel runs forward (attnzoo.core.blockbackward, the forward being
// blocksparse_attention.cpp): FlashAttention-2's recomputing backward over each query block's key-block list.
//
// dq, dk, dv = gradients of (out, lse) of softmax(q k^T * scale over the listed keys) v, recomputed from the
//   saved lse, given d_out and d_lse (optional), where
//   q, out, d_out (B, Hq, Nq, D|Dv), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): any strides with a unit last one;
//   lse, d_lse (B, Hq, Nq) contiguous (lse -inf where a row saw no key: its probabilities are 0);
//   blocks, skip, pad, causal/offset, bias/bias_lo and cap exactly as blocksparse_attention takes them: key-block
//   lists (Bl, Hl, nqb | 1, S) int64 (-1 = none; Hl 1, Hkv or Hq; one row shared by every query block), key
//   blocks of skip_block_k keys a query block's one-key blocks skip (a token layout minus its block layout),
//   key j visible to query i when j <= i + offset (causal), key padding (B, Nk) bool (False hides), a distance
//   bias (Hb, L) at column key - query - bias_lo, then the soft cap cap * tanh(x / cap) (lse is of the result);
//   part (Bl, Hl, nqb, S) int64 or empty: for each listed block the index of its element mask in masks
//   (M, block_q, block_k) bool (-1: the block is whole), a partial block's visible (query, key) pairs (mask_mod).
//   With bias_grad, d_bias (Hb, L) is the gradient of the biased scores summed per head row and bias column (the
//   caller pulls it back to the bias's own tensors: a learned table or learned ALiBi slopes).
// Row group: (batch row, the query heads sharing a layout row, query block), its rows packed head-major in
// tiles of at most kRows. Its keys are the runs of its list (adjacent blocks merged, clipped to Nk and to its
// last row's position); keys every row of a tile sees are processed in chunks of up to kCols, short runs packed
// together into one chunk (a copy of their key and value rows; their dK/dV added back after), keys at the
// causal diagonal in place, each row up to its own position; a partial block in place under its element mask.
// Per chunk:
//   S = (q*scale) k^T (+ bias, capped: the slope 1 - tanh^2 kept), P = exp(S - lse) (0 where hidden),
//   dV += P^T dO, dP = dO v^T, dS = P (dP - delta) (times the slope), dQ += dS k * scale, dK += dS^T (q*scale),
// with delta = rowsum(dO * out) - d_lse taken while packing the rows: five GEMMs, no (Nq, Nk) intermediate.
// dK/dV ownership: with at least kMinItems (batch row, KV head) pairs, one work item per pair runs every row
// group of its query heads and owns that head's dK/dV. With fewer, the rows' dQ is one pass over row groups
// (three GEMMs per chunk) and dK/dV a key-major pass over the transposed lists: one item per (pair, tile of
// kKeyTile keys) runs the row groups that read the tile, over the tile's keys only (four GEMMs per chunk).
// d_bias: each work item that computes dQ (one per pair, or one per run of query blocks of a row-group head in the
// key-major schedule: at least kBiasParts of them) sums dS per bias column in its own buffer, one row per query
// head it covers (or one shared row); the buffers are added up in item order after the parallel loop.
// Deterministic for any thread count: the items and the order of every sum depend on the shapes only, each item
// runs on one thread with single-threaded BLAS (SequentialBlas); built with -fopenmp (core/cpp.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "flash_common.h"

namespace {

using attnzoo_flash::fast_exp;
using attnzoo_flash::gemm;
using attnzoo_flash::gemm_nt;
using attnzoo_flash::SequentialBlas;

constexpr int64_t kCols = 512;     // keys per chunk
constexpr int64_t kRows = 256;     // query rows per tile
constexpr int64_t kMinItems = 8;   // fewer (batch row, KV head) pairs than this: the key-major dK/dV pass
constexpr int64_t kKeyTile = 512;  // keys per item of the key-major pass
constexpr int64_t kBiasParts = 64; // d_bias in the key-major schedule: at least this many dQ items (if blocks allow)

using Runs = std::vector<std::pair<int64_t, int64_t>>;

// keys [j0, j1) of a partial block read under element mask m, whose column 0 is key j0 - col
struct Part {
  int64_t j0, j1, m, col;
};
using Parts = std::vector<Part>;

template <typename T>
struct Args {
  const T *q, *k, *v, *out, *dout, *lse, *dlse;  // dlse: nullptr when none
  const int64_t* blocks;                          // (Bl, Hl, nqb | 1, S)
  int64_t Bl, Hl, S;
  bool shared;           // one list for every query block
  const int64_t* part;   // (Bl, Hl, nqb, S): element-mask index per listed block (-1: whole), or nullptr
  const bool* masks;     // (M, block_q, block_k)
  const int64_t* skip;   // (Bs, Hs, nqb, S2) or nullptr
  int64_t Bs, Hs, S2, skip_bk, nskip;
  const bool* pad;       // (B, Nk) or nullptr
  const T* bias;         // (Hb, bias_len) or nullptr
  int64_t bias_rows, bias_len, bias_lo;
  T cap, scale;          // cap 0: none
  bool causal;
  int64_t offset;
  T *dq, *dk, *dv;
  T* dbias;              // bias_grad: the (Hb, bias_len) output, or nullptr
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv, nqb, block_q, block_k, heads;
  int64_t qs[3], ks[3], vs[3], os[3], dos[3];
  int64_t groups() const { return Hq / heads; }  // row groups per (batch row, query block)
};

// per-thread buffers: a row group's packed scaled queries, output gradients, lse and delta; a tile's scores /
// probabilities, their gradients, the cap's slopes and its dQ; a packed chunk's keys, values, positions, padding,
// bias and dK/dV; the skip marks and the runs
template <typename T>
struct Scratch {
  std::vector<T> qp, gp, lse, delta, p, ds, slope, dq, kp, vp, bt, dkp, dvp;
  std::vector<int64_t> pos;
  std::unique_ptr<bool[]> pp, mrow;  // a packed chunk's padding; a partial block's row mask (with padding)
  std::vector<uint8_t> marks;
  Runs runs, pieces;
  explicit Scratch(const Args<T>& a)
      : qp(a.heads * a.block_q * a.D), gp(a.heads * a.block_q * a.Dv), lse(a.heads * a.block_q),
        delta(a.heads * a.block_q), p(kRows * kCols), ds(kRows * kCols), slope(a.cap > 0 ? kRows * kCols : 0),
        dq(kRows * a.D), kp(kCols * a.D), vp(kCols * a.Dv), bt(kCols), dkp(kCols * a.D), dvp(kCols * a.Dv),
        pos(kCols), pp(new bool[kCols]), mrow(new bool[kCols]), marks(a.nskip, 0) {}
};

// the key runs [first, last) that row group (b, hg, qb) reads within [from, to): its listed blocks clipped to the
// keys, to [from, to) and (causal) to its last row's position, adjacent whole ones merged, partial ones in `parts`;
// one-key blocks inside a skipped block left out
template <typename T>
void row_runs(const Args<T>& a, int64_t b, int64_t hg, int64_t qb, int64_t from, int64_t to, Scratch<T>& w,
              Runs& runs, Parts& parts) {
  const int64_t h0 = hg * a.heads, kv = h0 / (a.Hq / a.Hkv);
  const int64_t lh = a.Hl == 1 ? 0 : (a.Hl == a.Hkv ? kv : h0);
  const int64_t at = (((a.Bl == 1 ? 0 : b) * a.Hl + lh) * (a.shared ? 1 : a.nqb) + (a.shared ? 0 : qb)) * a.S;
  const int64_t* row = a.blocks + at;
  const int64_t* prow = a.part ? a.part + at : nullptr;
  const int64_t* srow = nullptr;
  if (a.skip) {
    const int64_t sh = a.Hs == 1 ? 0 : (a.Hs == a.Hkv ? kv : h0);
    srow = a.skip + (((a.Bs == 1 ? 0 : b) * a.Hs + sh) * a.nqb + qb) * a.S2;
    for (int64_t s = 0; s < a.S2; ++s)
      if (srow[s] >= 0 && srow[s] < a.nskip) w.marks[srow[s]] = 1;
  }
  const int64_t i0 = qb * a.block_q, nr = std::min(a.Nq, i0 + a.block_q) - i0;
  const int64_t limit = std::min({to, a.Nk, a.causal ? i0 + nr + a.offset : a.Nk});
  runs.clear();
  parts.clear();
  for (int64_t s = 0; s < a.S; ++s) {
    if (row[s] < 0) continue;
    const int64_t first = row[s] * a.block_k;
    if (srow && first < a.Nk && w.marks[first / a.skip_bk]) continue;
    const int64_t j0 = std::max(first, from), j1 = std::min(first + a.block_k, limit);
    if (j1 <= j0) continue;
    if (prow && prow[s] >= 0)
      parts.push_back({j0, j1, prow[s], j0 - first});
    else if (!runs.empty() && runs.back().second == j0)
      runs.back().second = j1;
    else
      runs.emplace_back(j0, j1);
  }
  if (srow)
    for (int64_t s = 0; s < a.S2; ++s)
      if (srow[s] >= 0 && srow[s] < a.nskip) w.marks[srow[s]] = 0;
}

// one row's probabilities over the chunk's first `vis` columns in place, from its scores: + the bias br (BIAS),
// the soft cap as cap + cap * u with u = tanh(x / cap) - 1 = -2 / (exp(2x / cap) + 1) and its slope
// 1 - tanh^2 = -u (2 + u) into sl (CAP; exact near saturation), exp(x - lse), times the visibility mk (MASK)
template <typename T, bool BIAS, bool CAP, bool MASK>
inline void probs_pass(T* s, const T* br, T* sl, const bool* mk, int64_t vis, T lse, T cap) {
  const T two_over_cap = CAP ? T(2) / cap : T(0);
#pragma omp simd
  for (int64_t c = 0; c < vis; ++c) {
    const T x = attnzoo_flash::modified_score<T, BIAS, CAP>(s[c], br, sl, c, cap, two_over_cap);
    const T e = fast_exp(x - lse);  // a hidden score's exp is finite (fast_exp clamps): masked by a multiply
    s[c] = MASK ? e * T(mk[c]) : e;
  }
}

template <typename T, bool BIAS, bool CAP>
inline void probs(T* s, const T* br, T* sl, const bool* mk, int64_t vis, T lse, T cap) {
  if (mk)
    probs_pass<T, BIAS, CAP, true>(s, br, sl, mk, vis, lse, cap);
  else
    probs_pass<T, BIAS, CAP, false>(s, br, sl, mk, vis, lse, cap);
}

template <typename T>
inline void probs(T* s, const T* br, T* sl, const bool* mk, int64_t vis, T lse, T cap) {
  if (br && cap > 0) probs<T, true, true>(s, br, sl, mk, vis, lse, cap);
  else if (br) probs<T, true, false>(s, br, sl, mk, vis, lse, cap);
  else if (cap > 0) probs<T, false, true>(s, br, sl, mk, vis, lse, cap);
  else probs<T, false, false>(s, br, sl, mk, vis, lse, cap);
}

// The gradients of row group (b, hg, qb) over the keys `runs`: its rows' dQ (want_dq: written to a.dq), with
// dk/dv (its KV head's (Nk, D | Dv) gradients) the keys' dK/dV added there, and with db (d_bias sums: its first
// query head's row, the next heads' rows following; one row when the bias is shared) dS added per bias column.
template <typename T>
void row_group(const Args<T>& a, int64_t b, int64_t hg, int64_t qb, const Runs& runs, const Parts& parts, T* dk,
               T* dv, bool want_dq, T* db, Scratch<T>& w) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t h0 = hg * a.heads, kv = h0 / (a.Hq / a.Hkv);
  const int64_t i0 = qb * a.block_q, nr = std::min(a.Nq, i0 + a.block_q) - i0, total = a.heads * nr;
  const T* k = a.k + b * a.ks[0] + kv * a.ks[1];
  const T* v = a.v + b * a.vs[0] + kv * a.vs[1];
  const bool* pad = a.pad ? a.pad + b * a.Nk : nullptr;
  // the rows, head-major: row rr is query head h0 + rr / nr at position i0 + rr % nr
  for (int64_t rr = 0; rr < total; ++rr) {
    const int64_t hq = h0 + rr / nr, i = i0 + rr % nr;
    attnzoo_flash::pack_grad_row(a, b, hq, i, w.qp.data() + rr * a.D, w.gp.data() + rr * a.Dv, w.lse[rr],
                                 w.delta[rr]);
  }
  for (int64_t r0 = 0; r0 < total; r0 += kRows) {
    const int64_t r1 = std::min(total, r0 + kRows), rows = r1 - r0;
    // the tile's least and greatest position (rows wrap over heads)
    int64_t p_lo = i0 + a.offset + r0 % nr, p_hi = i0 + a.offset + (r1 - 1) % nr;
    if (rows >= nr || (r1 - 1) % nr < r0 % nr) p_lo = i0 + a.offset, p_hi = i0 + a.offset + nr - 1;
    if (want_dq) std::fill(w.dq.begin(), w.dq.begin() + rows * a.D, T(0));
    // one chunk of n keys: rows of kc (ldk) and vc (ldv), dK/dV rows dkc, dvc (ld D, Dv); in place from key j0
    // (pos nullptr), or packed (key c at pos[c], padding w.pp); `whole`: every row sees all n, else (in place)
    // row r sees the keys up to its position; em: an element mask, query position p's row at em + p * block_k
    auto chunk = [&](const T* kc, int64_t ldk, const T* vc, int64_t ldv, T* dkc, T* dvc, int64_t n, int64_t j0,
                     const int64_t* pos, bool whole, const bool* em = nullptr) {
      gemm('T', n, rows, a.D, kc, ldk, w.qp.data() + r0 * a.D, a.D, T(0), w.p.data(), kCols);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t rr = r0 + r, rp = i0 + a.offset + rr % nr;
        T* pr = w.p.data() + r * kCols;
        const int64_t vis = whole ? n : std::clamp<int64_t>(rp - j0 + 1, 0, n);
        const T l = w.lse[rr];
        if (vis == 0 || l == ninf) {
          std::fill(pr, pr + n, T(0));
          continue;
        }
        const T* br = nullptr;
        if (a.bias) {  // the bias of key j: element j - rp - bias_lo of the head's row
          const T* row = a.bias + (a.bias_rows == 1 ? 0 : (h0 + rr / nr) * a.bias_len) - a.bias_lo - rp;
          if (pos) {
            for (int64_t c = 0; c < vis; ++c) w.bt[c] = row[pos[c]];
            br = w.bt.data();
          } else {
            br = row + j0;
          }
        }
        const bool* mk = pad ? (pos ? w.pp.get() : pad + j0) : nullptr;
        if (em) {  // a partial block's row, with the padding
          const bool* er = em + (rr % nr) * a.block_k;
          for (int64_t c = 0; c < vis; ++c) w.mrow[c] = er[c] && (!mk || mk[c]);
          mk = w.mrow.get();
        }
        probs(pr, br, a.cap > 0 ? w.slope.data() + r * kCols : nullptr, mk, vis, l, a.cap);
        std::fill(pr + vis, pr + n, T(0));
      }
      // dV (n x Dv, row-major) += P^T dO
      if (dk) gemm_nt(a.Dv, n, rows, w.gp.data() + r0 * a.Dv, a.Dv, w.p.data(), kCols, dvc, a.Dv);
      // dP (rows x n) = dO . vc^T, then dS = P (dP - delta) in place
      gemm('T', n, rows, a.Dv, vc, ldv, w.gp.data() + r0 * a.Dv, a.Dv, T(0), w.ds.data(), kCols);
      for (int64_t r = 0; r < rows; ++r) {
        T* sr = w.ds.data() + r * kCols;
        attnzoo_flash::grad_scores(sr, w.p.data() + r * kCols,
                                   a.cap > 0 ? w.slope.data() + r * kCols : nullptr, w.delta[r0 + r], n);
        if (db) {  // every column: dS is 0 where P is; key j's bias column is j - rp - bias_lo (as read above)
          const int64_t rr = r0 + r, rp = i0 + a.offset + rr % nr;
          T* dst = db + (a.bias_rows == 1 ? 0 : rr / nr) * a.bias_len - a.bias_lo - rp;
          if (pos) {
            for (int64_t c = 0; c < n; ++c) dst[pos[c]] += sr[c];
          } else {
            dst += j0;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) dst[c] += sr[c];
          }
        }
      }
      // dQ (rows x D) += dS . kc
      if (want_dq) gemm('N', a.D, rows, n, kc, ldk, w.ds.data(), kCols, T(1), w.dq.data(), a.D);
      // dK (n x D) += dS^T qp (q already scaled)
      if (dk) gemm_nt(a.D, n, rows, w.qp.data() + r0 * a.D, a.D, w.ds.data(), kCols, dkc, a.D);
    };
    // whole pieces waiting to be packed into one chunk: one alone is read in place
    int64_t packed = 0;
    auto flush = [&] {
      if (w.pieces.size() == 1) {
        const int64_t j0 = w.pieces[0].first;
        chunk(k + j0 * a.ks[2], a.ks[2], v + j0 * a.vs[2], a.vs[2], dk ? dk + j0 * a.D : nullptr,
              dv ? dv + j0 * a.Dv : nullptr, packed, j0, nullptr, true);
      } else if (!w.pieces.empty()) {
        int64_t c = 0;
        for (const auto& pc : w.pieces)
          for (int64_t j = pc.first; j < pc.second; ++j, ++c) {
            std::copy(k + j * a.ks[2], k + j * a.ks[2] + a.D, w.kp.data() + c * a.D);
            std::copy(v + j * a.vs[2], v + j * a.vs[2] + a.Dv, w.vp.data() + c * a.Dv);
            w.pos[c] = j;
            if (pad) w.pp[c] = pad[j];
          }
        if (dk) {
          std::fill(w.dkp.begin(), w.dkp.begin() + packed * a.D, T(0));
          std::fill(w.dvp.begin(), w.dvp.begin() + packed * a.Dv, T(0));
        }
        chunk(w.kp.data(), a.D, w.vp.data(), a.Dv, w.dkp.data(), w.dvp.data(), packed, 0, w.pos.data(), true);
        if (dk)
          for (int64_t c2 = 0; c2 < packed; ++c2) {
            T* dkr = dk + w.pos[c2] * a.D;
            T* dvr = dv + w.pos[c2] * a.Dv;
            const T* sk = w.dkp.data() + c2 * a.D;
            const T* sv = w.dvp.data() + c2 * a.Dv;
            for (int64_t d = 0; d < a.D; ++d) dkr[d] += sk[d];
            for (int64_t d = 0; d < a.Dv; ++d) dvr[d] += sv[d];
          }
      }
      w.pieces.clear();
      packed = 0;
    };
    attnzoo_flash::walk_runs(runs, a.causal, p_lo, p_hi, kCols, false, w.pieces, packed, flush,
                             [&](int64_t j0, int64_t n) {
                               chunk(k + j0 * a.ks[2], a.ks[2], v + j0 * a.vs[2], a.vs[2],
                                     dk ? dk + j0 * a.D : nullptr, dv ? dv + j0 * a.Dv : nullptr, n, j0, nullptr,
                                     false);
                             });
    for (const Part& pt : parts) {  // in place under its element mask (every row up to its position)
      const bool* em = a.masks + pt.m * a.block_q * a.block_k + pt.col;
      for (int64_t j0 = pt.j0; j0 < pt.j1; j0 += kCols) {
        const int64_t n = std::min(kCols, pt.j1 - j0);
        chunk(k + j0 * a.ks[2], a.ks[2], v + j0 * a.vs[2], a.vs[2], dk ? dk + j0 * a.D : nullptr,
              dv ? dv + j0 * a.Dv : nullptr, n, j0, nullptr, !a.causal, em + (j0 - pt.j0));
      }
    }
    if (want_dq)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t rr = r0 + r;
        T* dst = a.dq + ((b * a.Hq + h0 + rr / nr) * a.Nq + i0 + rr % nr) * a.D;
        for (int64_t d = 0; d < a.D; ++d) dst[d] = w.dq[r * a.D + d] * a.scale;
      }
  }
}

// the items' d_bias sums (items x rows x bias_len, item t's first row that of query head head_of(t)) added into
// a.dbias in item order
template <typename T, typename HeadOf>
void add_bias_parts(const Args<T>& a, const std::vector<T>& parts, int64_t items, int64_t rows, HeadOf head_of) {
  for (int64_t t = 0; t < items; ++t)
    for (int64_t g = 0; g < rows; ++g) {
      T* dst = a.dbias + (a.bias_rows == 1 ? 0 : head_of(t) + g) * a.bias_len;
      const T* src = parts.data() + (t * rows + g) * a.bias_len;
      for (int64_t e = 0; e < a.bias_len; ++e) dst[e] += src[e];
    }
}

template <typename T>
void run(const Args<T>& a) {
  const int64_t pairs = a.B * a.Hkv, hgs = a.groups(), per_kv = hgs / a.Hkv, G = a.Hq / a.Hkv;
  std::vector<T> db;  // the items' d_bias sums
  if (pairs >= kMinItems) {  // one item per (batch row, KV head): every row group of its heads, its dK/dV
    const int64_t rows = a.bias_rows == 1 ? 1 : G;  // the item's query heads' rows
    if (a.dbias) db.assign(pairs * rows * a.bias_len, T(0));
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t stop) {
      SequentialBlas sequential;
      Scratch<T> w(a);
      Runs runs;
      Parts parts;
      for (int64_t t = begin; t < stop; ++t) {
        const int64_t b = t / a.Hkv, kv = t % a.Hkv;
        for (int64_t hg = kv * per_kv; hg < (kv + 1) * per_kv; ++hg) {
          T* dbt = a.dbias ? db.data() + (t * rows + (rows == 1 ? 0 : (hg - kv * per_kv) * a.heads)) * a.bias_len
                           : nullptr;
          for (int64_t qb = 0; qb < a.nqb; ++qb) {
            row_runs(a, b, hg, qb, 0, a.Nk, w, runs, parts);
            row_group(a, b, hg, qb, runs, parts, a.dk + t * a.Nk * a.D, a.dv + t * a.Nk * a.Dv, true, dbt, w);
          }
        }
      }
    });
    if (a.dbias) add_bias_parts(a, db, pairs, rows, [&](int64_t t) { return (t % a.Hkv) * G; });
    return;
  }
  // few pairs: dQ over every row group, then dK/dV per (pair, key tile) over the row groups that read the tile.
  // dQ items: runs of `per` query blocks of one (batch row, row-group head); one block each unless d_bias is
  // wanted, then at least kBiasParts items where the blocks allow (each item's sums in its own buffer)
  const int64_t heads_b = a.B * hgs, ntiles = (a.Nk + kKeyTile - 1) / kKeyTile;
  const int64_t runs_per = a.dbias ? std::min(a.nqb, (kBiasParts + heads_b - 1) / heads_b) : a.nqb;
  const int64_t per = (a.nqb + runs_per - 1) / runs_per, items = heads_b * runs_per;
  const int64_t rows = a.bias_rows == 1 ? 1 : a.heads;  // a row group's query heads' rows
  if (a.dbias) db.assign(items * rows * a.bias_len, T(0));
  // the transposed lists: per (batch row, row-group head), the query blocks reading each key tile (CSR)
  std::vector<std::vector<int64_t>> first(heads_b), readers(heads_b);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t stop) {
    SequentialBlas sequential;
    Scratch<T> w(a);
    Runs runs;
    Parts parts;
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t b = t / (hgs * runs_per), hg = (t / runs_per) % hgs, qb0 = (t % runs_per) * per;
      T* dbt = a.dbias ? db.data() + t * rows * a.bias_len : nullptr;
      for (int64_t qb = qb0; qb < std::min(a.nqb, qb0 + per); ++qb) {
        row_runs(a, b, hg, qb, 0, a.Nk, w, runs, parts);
        row_group(a, b, hg, qb, runs, parts, static_cast<T*>(nullptr), static_cast<T*>(nullptr), true, dbt, w);
      }
    }
  });
  if (a.dbias) add_bias_parts(a, db, items, rows, [&](int64_t t) { return (t / runs_per) % hgs * a.heads; });
  at::parallel_for(0, a.B * hgs, 1, [&](int64_t begin, int64_t stop) {
    SequentialBlas sequential;
    Scratch<T> w(a);
    Runs runs;
    Parts parts;
    std::vector<int64_t> tiles, mine;  // (tile, query block) pairs, query blocks ascending; one block's tiles
    for (int64_t t = begin; t < stop; ++t) {
      tiles.clear();
      for (int64_t qb = 0; qb < a.nqb; ++qb) {
        row_runs(a, t / hgs, t % hgs, qb, 0, a.Nk, w, runs, parts);
        mine.clear();
        for (const auto& r : runs)
          for (int64_t x = r.first / kKeyTile; x <= (r.second - 1) / kKeyTile; ++x) mine.push_back(x);
        for (const Part& pt : parts)
          for (int64_t x = pt.j0 / kKeyTile; x <= (pt.j1 - 1) / kKeyTile; ++x) mine.push_back(x);
        std::sort(mine.begin(), mine.end());  // a list need not be sorted: each tile once
        mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
        for (const int64_t x : mine) tiles.push_back(x), tiles.push_back(qb);
      }
      std::vector<int64_t>& f = first[t];
      std::vector<int64_t>& rd = readers[t];
      f.assign(ntiles + 1, 0);
      for (size_t e = 0; e < tiles.size(); e += 2) ++f[tiles[e] + 1];
      for (int64_t x = 0; x < ntiles; ++x) f[x + 1] += f[x];
      rd.resize(tiles.size() / 2);
      std::vector<int64_t> fill(f.begin(), f.end() - 1);
      for (size_t e = 0; e < tiles.size(); e += 2) rd[fill[tiles[e]]++] = tiles[e + 1];
    }
  });
  at::parallel_for(0, pairs * ntiles, 1, [&](int64_t begin, int64_t stop) {
    SequentialBlas sequential;
    Scratch<T> w(a);
    Runs runs;
    Parts parts;
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t pair = t / ntiles, x = t % ntiles, b = pair / a.Hkv, kv = pair % a.Hkv;
      for (int64_t hg = kv * per_kv; hg < (kv + 1) * per_kv; ++hg) {
        const std::vector<int64_t>& f = first[b * hgs + hg];
        const std::vector<int64_t>& rd = readers[b * hgs + hg];
        for (int64_t e = f[x]; e < f[x + 1]; ++e) {
          row_runs(a, b, hg, rd[e], x * kKeyTile, (x + 1) * kKeyTile, w, runs, parts);
          row_group(a, b, hg, rd[e], runs, parts, a.dk + pair * a.Nk * a.D, a.dv + pair * a.Nk * a.Dv, false,
                    static_cast<T*>(nullptr), w);
        }
      }
    }
  });
}

}  // namespace

// returns dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv), contiguous, in q's dtype (float32/64), and
// with bias_grad d_bias (Hb, L) (else an undefined tensor)
std::vector<at::Tensor> block_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& d_out, const at::Tensor& lse,
                                       const std::optional<at::Tensor>& d_lse, const at::Tensor& blocks,
                                       const std::optional<at::Tensor>& pad, int64_t block_q, int64_t block_k,
                                       int64_t heads, double scale, bool causal, int64_t offset,
                                       const std::optional<at::Tensor>& bias, int64_t bias_lo, double cap,
                                       const std::optional<at::Tensor>& skip, int64_t skip_block_k,
                                       const std::optional<at::Tensor>& part, const std::optional<at::Tensor>& masks,
                                       bool bias_grad) {
  const char* op = "block_backward";
  attnzoo_flash::check_backward_operands(op, q, k, v, out, d_out, lse, d_lse);
  const auto dtype = q.scalar_type();
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(blocks.dim() == 4 && heads > 0 && (Hq / Hkv) % heads == 0, op, ": 4-D blocks, heads dividing the group");
  TORCH_CHECK(block_q > 0 && block_k > 0 && cap >= 0, op, ": block sizes > 0, cap >= 0");
  const int64_t nqb = (Nq + block_q - 1) / block_q;
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.is_contiguous() &&
                  (blocks.size(0) == 1 || blocks.size(0) == B) &&
                  (blocks.size(1) == 1 || blocks.size(1) == Hkv || blocks.size(1) == Hq) &&
                  (blocks.size(2) == nqb || blocks.size(2) == 1), op,
              ": blocks (1 | B, 1 | Hkv | Hq, query blocks | 1, S) int64 contiguous");
  const bool has_skip = skip.has_value() && skip->defined();
  TORCH_CHECK(!has_skip || (skip->scalar_type() == at::kLong && skip->is_contiguous() && skip->dim() == 4 &&
                            (skip->size(0) == 1 || skip->size(0) == B) &&
                            (skip->size(1) == 1 || skip->size(1) == Hkv || skip->size(1) == Hq) &&
                            skip->size(2) == nqb && skip_block_k > 0),
              op, ": skip (1 | B, 1 | Hkv | Hq, query blocks, S2) int64 with skip_block_k > 0");
  const bool has_part = part.has_value() && part->defined();
  TORCH_CHECK(!has_part || (part->scalar_type() == at::kLong && part->is_contiguous() &&
                            part->sizes() == blocks.sizes() && masks.has_value() && masks->scalar_type() == at::kBool &&
                            masks->is_contiguous() && masks->dim() == 3 && masks->size(1) == block_q &&
                            masks->size(2) == block_k && blocks.size(2) == nqb),
              op, ": part (blocks' shape) int64 with masks (M, block_q, block_k) bool");
  if (has_part && part->numel()) {
    const auto range = at::aminmax(*part);
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= -1 && std::get<1>(range).item<int64_t>() < masks->size(0), op,
                ": part indices in [-1, M)");
  }
  const auto grads = attnzoo_flash::backward_grads(q, k, v);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!bias_grad || has_bias, op, ": bias_grad without a bias");
  auto d_bias = bias_grad ? at::zeros(bias->sizes(), q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "block_backward", [&] {
    Args<scalar_t> a{};
    attnzoo_flash::backward_operands<scalar_t>(a, op, q, k, v, out, d_out, lse, d_lse, pad, grads);
    a.blocks = blocks.data_ptr<int64_t>();
    a.Bl = blocks.size(0), a.Hl = blocks.size(1), a.S = blocks.size(3);
    a.shared = blocks.size(2) == 1 && nqb > 1;
    a.part = has_part ? part->data_ptr<int64_t>() : nullptr;
    a.masks = has_part ? masks->data_ptr<bool>() : nullptr;
    a.skip = has_skip ? skip->data_ptr<int64_t>() : nullptr;
    a.Bs = has_skip ? skip->size(0) : 1, a.Hs = has_skip ? skip->size(1) : 1, a.S2 = has_skip ? skip->size(3) : 0;
    a.skip_bk = has_skip ? skip_block_k : 1;
    a.nskip = has_skip ? (Nk + skip_block_k - 1) / skip_block_k : 0;
    a.bias = nullptr, a.bias_rows = 1, a.bias_len = 0, a.bias_lo = 0;
    if (has_bias) {
      TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->dim() == 2 &&
                      (bias->size(0) == 1 || bias->size(0) == Hq) && bias_lo <= 1 - Nk && bias_lo + bias->size(1) >= Nq,
                  op, ": bias (1 or Hq, L) in q's dtype covering the distances [1 - Nk, Nq - 1]");
      a.bias = bias->data_ptr<scalar_t>(), a.bias_rows = bias->size(0), a.bias_len = bias->size(1);
      a.bias_lo = bias_lo;
    }
    a.cap = static_cast<scalar_t>(cap), a.scale = static_cast<scalar_t>(scale);
    a.causal = causal, a.offset = offset;
    a.dbias = bias_grad ? d_bias.data_ptr<scalar_t>() : nullptr;
    a.nqb = nqb, a.block_q = block_q, a.block_k = block_k, a.heads = heads;
    if (B > 0 && Nq > 0 && Hq > 0 && Nk > 0) run(a);
    else if (grads[0].numel()) grads[0].zero_();
  });
  return {grads[0], grads[1], grads[2], d_bias};
}

TORCH_LIBRARY(attnzoo_block_backward, m) { m.def("block_backward", &block_backward); }
