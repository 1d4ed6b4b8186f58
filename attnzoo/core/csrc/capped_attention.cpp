// Flash-style CPU attention with a soft cap on the scores (attnzoo.core.capped; docs/architecture.md).
//
// out, lse = attention of q (X, Y, Lq, D) over k, v (X, Y, Lk, D|Dv) where the score of query i and key j is
//   x = scale * q_i . k_j + mask[i, j]          (mask: optional additive, -inf hides a key)
//   x = cap * tanh(x / cap)                      (when cap > 0; a hidden key stays hidden)
// and, with `causal`, key j is visible to query i only when j <= i + offset. With `idx` (X, Y, Lk) int64, key j
// of (x, y) is row idx[x, y, j] of k and v (a selection read in place: each block of keys is copied into a
// worker's scratch rows for its GEMMs, no gathered copy of the selection in memory; not with `causal`).
// Work items are (x, y, block of query rows), run in parallel; each walks blocks of keys: one GEMM for the
// scores, one pass (mask + cap + row maximum), one pass (exp + row sum, online rescale), one GEMM into the
// output. Rows of every tensor need a unit last stride; every other stride is free (expanded heads,
// overlapping windows). GEMMs are BLAS sgemm_/dgemm_, which libtorch_cpu exports (MKL).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
  std::fill(m.begin(), m.end(), ninf);
  std::fill(l.begin(), l.end(), T(0));
  std::fill(acc.begin(), acc.end(), T(0));
  const int64_t end = a.causal ? std::min(a.Lk, std::max<int64_t>(0, i1 - 1 + a.offset + 1)) : a.Lk;
  const T two_over_cap = a.cap > 0 ? T(2) / a.cap : T(0), minus_two_cap = -2 * a.cap;
  for (int64_t j0 = 0; j0 < end; j0 += kBlockK) {
    const int64_t n = std::min(kBlockK, end - j0);
    const T *kb = k + j0 * a.ks[2], *vb = v + j0 * a.vs[2];  // this block's keys and values (row strides ldk, ldv)
    int64_t ldk = a.ks[2], ldv = a.vs[2];
    if (idx) {  // the selected rows, copied into scratch rows
      for (int64_t c = 0; c < n; ++c) {
        std::memcpy(kbuf.data() + c * a.D, k + idx[j0 + c] * a.ks[2], a.D * sizeof(T));
        std::memcpy(vbuf.data() + c * a.Dv, v + idx[j0 + c] * a.vs[2], a.Dv * sizeof(T));
      }
      kb = kbuf.data(), vb = vbuf.data(), ldk = a.D, ldv = a.Dv;
    }
    // s (rows x n, row stride kBlockK) = q_block . k_block^T
    if (a.k_col > 0)  // K^T stored contiguous along keys: a plain GEMM (no transposed packing)
      gemm('N', n, rows, a.D, k + j0, a.k_col, q, a.qs[2], T(0), s.data(), kBlockK);
    else
      gemm('T', n, rows, a.D, kb, ldk, q, a.qs[2], T(0), s.data(), kBlockK);
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s.data() + r * kBlockK;
      const int64_t vis = a.causal ? std::min(n, std::max<int64_t>(0, i0 + r + a.offset - j0 + 1)) : n;
      const T* mr = mask ? mask + (i0 + r) * a.ms[2] + j0 * a.ms[3] : nullptr;
      const T mx = a.cap > 0 ? logits<T, true>(sr, mr, a.ms[3], vis, a.scale, two_over_cap, minus_two_cap)
                             : logits<T, false>(sr, mr, a.ms[3], vis, a.scale, two_over_cap, minus_two_cap);
      softmax_step(sr, vis, n, mx, m[r], l[r], acc.data() + r * a.Dv, a.Dv);
    }
    // acc (rows x Dv) += p (rows x n) . v_block (n x Dv)
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
    std::vector<T> s(kBlockQ * kBlockK), acc(kBlockQ * a.Dv), m(kBlockQ), l(kBlockQ);
    std::vector<T> kbuf(a.idx ? kBlockK * a.D : 0), vbuf(a.idx ? kBlockK * a.Dv : 0);
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t xy = t / nblocks, i0 = (t % nblocks) * kBlockQ;
      block(a, xy / a.Y, xy % a.Y, i0, std::min(a.Lq, i0 + kBlockQ), s, acc, m, l, kbuf, vbuf);
    }
  });
}

}  // namespace

// q (X, Y, Lq, D), k (X, Y, Lk, D), v (X, Y, Lk, Dv), mask: additive (X, Y, Lq, Lk) with any strides, or empty;
// idx: (X, Y, Lk') int64 with any strides, or empty: the rows of k and v read (Lk' keys; k, v hold any number);
// returns out (X, Y, Lq, Dv) and lse (X, Y, Lq) in q's dtype (float32 or float64)
std::vector<at::Tensor> capped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& mask, double scale, double cap, bool causal,
                                         int64_t offset, const std::optional<at::Tensor>& idx) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "capped_attention: q, k, v must be 4-D");
  const bool gathered = idx.has_value() && idx->defined();
  const bool k_col = !gathered && k.stride(3) != 1 && k.stride(2) == 1 && k.size(2) > 1;
  TORCH_CHECK(q.stride(3) == 1 && (k.stride(3) == 1 || k_col) && v.stride(3) == 1,
              "capped_attention: unit last strides (or k transposed in memory)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "capped_attention: dtypes");
  const int64_t X = q.size(0), Y = q.size(1), Lq = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t Lk = gathered ? idx->size(2) : k.size(2);
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
    Args<scalar_t> a{};
    a.q = q.data_ptr<scalar_t>();
    a.k = k.data_ptr<scalar_t>();
    a.v = v.data_ptr<scalar_t>();
    a.mask = nullptr;
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->dim() == 4 && mask->scalar_type() == q.scalar_type(), "capped_attention: mask");
      a.mask = mask->data_ptr<scalar_t>();
      for (int i = 0; i < 4; ++i) a.ms[i] = mask->size(i) == 1 ? 0 : mask->stride(i);
    }
    a.out = out.data_ptr<scalar_t>();
    a.lse = lse.data_ptr<scalar_t>();
    a.X = X, a.Y = Y, a.Lq = Lq, a.Lk = Lk, a.D = D, a.Dv = Dv;
    operand_strides(q, D, a.qs, "capped_attention", "q");
    operand_strides(v, Dv, a.vs, "capped_attention", "v");
    operand_strides(out, Dv, a.os, "capped_attention", "out");
    if (k_col) {  // K^T's rows (one per feature, Lk long) are the BLAS operand
      operand_strides(k.transpose(2, 3), Lk, a.ks, "capped_attention", "k (transposed)");
      a.k_col = a.ks[2];
    } else {
      operand_strides(k, D, a.ks, "capped_attention", "k");
      a.k_col = 0;
    }
    a.idx = nullptr;
    if (gathered) {
      a.idx = idx->data_ptr<int64_t>();
      for (int i = 0; i < 2; ++i) a.is[i] = idx->size(i) == 1 ? 0 : idx->stride(i);
      TORCH_CHECK(Lk <= 1 || idx->stride(2) == 1, "capped_attention: idx needs a unit last stride");
    }
    a.scale = static_cast<scalar_t>(scale);
    a.cap = static_cast<scalar_t>(cap);
    a.causal = causal;
    a.offset = offset;
    if (Lq > 0) run(a);
  });
  return {out, lse};
}

TORCH_LIBRARY(attnzoo, m) { m.def("capped_attention", &capped_attention); }
