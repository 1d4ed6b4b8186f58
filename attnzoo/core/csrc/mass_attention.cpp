// Flash-style CPU attention that also returns the probability mass each key received (attnzoo.cache.read;
// docs/architecture.md, KV cache). A cache policy that ranks tokens by accumulated attention (h2o, infllm) needs
// mass[j] = sum_i exp(s_ij - lse_i) over the prompt's queries; computed after the attention that is a second
// pass over every score. Here the scores of one block of query rows are kept for the whole row strip (the
// flash loop writes its exponentials there instead of a reused block buffer), so once the rows' lse is known
// the strip's column sums are one GEMV per key block, weighted by exp(m_block - m_final) / l: the scores are
// computed and exponentiated once, as in plain attention.
//
// out, lse, mass = attention of q (X, Y, Lq, D) over k, v (X, Y, Lk, D|Dv), score scale * q_i . k_j plus an
// optional per-key additive bias (X, Y, Lk) (-inf hides a key: padding); with `causal`, key j is visible to
// query i only when j <= i + offset (bottom-right: offset = Lk - Lq). mass is (X, Y, Lk): summed over the queries
// of one (x, y); rows that see nothing give out 0, lse -inf and no mass. Work items are (x, y) pairs (each owns
// its mass row), run in parallel. Rows of every tensor need a unit last stride. GEMMs, exp and the online-softmax
// step are flash_common.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "flash_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

using namespace attnzoo_flash;

constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockK = 512;

template <typename T>
struct Args {
  const T *q, *k, *v, *bias;
  T *out, *lse, *mass;
  int64_t X, Y, Lq, Lk, D, Dv;
  int64_t qs[3], ks[3], vs[3], bs[3], os[3];  // strides (x, y, row); the bias's (x, y, key)
  T scale;
  bool causal;
  int64_t offset;
};

// scratch of one worker: the row strip of probabilities (rows x Lk, every value written by the score GEMM before
// it is read, so left uninitialised), the output accumulators, and the maximum each row's block weights are
// relative to
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> s;
  std::vector<T> acc, m, l, mblk, w;
  int64_t ld;
  Scratch(int64_t rows, int64_t Lk, int64_t Dv)
      : s(new T[rows * std::max<int64_t>(Lk, 1)]), acc(rows * Dv), m(rows), l(rows),
        mblk(rows * ((Lk + kBlockK - 1) / kBlockK + 1)), w(rows), ld(std::max<int64_t>(Lk, 1)) {}
};

// one (x, y, query block): rows [i0, i1); adds their mass to the (x, y) row
template <typename T>
void block(const Args<T>& a, int64_t x, int64_t y, int64_t i0, int64_t i1, Scratch<T>& sc) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t rows = i1 - i0, ld = sc.ld, nkb = (a.Lk + kBlockK - 1) / kBlockK;
  const T* q = a.q + x * a.qs[0] + y * a.qs[1] + i0 * a.qs[2];
  const T* k = a.k + x * a.ks[0] + y * a.ks[1];
  const T* v = a.v + x * a.vs[0] + y * a.vs[1];
  const T* bias = a.bias ? a.bias + x * a.bs[0] + y * a.bs[1] : nullptr;
  std::fill(sc.m.begin(), sc.m.end(), ninf);
  std::fill(sc.l.begin(), sc.l.end(), T(0));
  std::fill(sc.acc.begin(), sc.acc.end(), T(0));
  const int64_t end = a.causal ? std::min(a.Lk, std::max<int64_t>(0, i1 - 1 + a.offset + 1)) : a.Lk;
  for (int64_t j0 = 0, jb = 0; j0 < end; j0 += kBlockK, ++jb) {
    const int64_t n = std::min(kBlockK, end - j0);
    T* sb = sc.s.get() + j0;  // this key block's columns of the strip (row stride ld)
    gemm('T', n, rows, a.D, k + j0 * a.ks[2], a.ks[2], q, a.qs[2], T(0), sb, ld);
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = sb + r * ld;
      const int64_t vis = a.causal ? std::min(n, std::max<int64_t>(0, i0 + r + a.offset - j0 + 1)) : n;
      T mx = ninf;
      if (bias) {
        const T* br = bias + j0 * a.bs[2];
        const int64_t bst = a.bs[2];
#pragma omp simd reduction(max : mx)
        for (int64_t c = 0; c < vis; ++c) {
          const T xv = sr[c] * a.scale + br[c * bst];
          sr[c] = xv;
          mx = xv > mx ? xv : mx;
        }
      } else {
#pragma omp simd reduction(max : mx)
        for (int64_t c = 0; c < vis; ++c) {
          const T xv = sr[c] * a.scale;
          sr[c] = xv;
          mx = xv > mx ? xv : mx;
        }
      }
      softmax_step(sr, vis, n, mx, sc.m[r], sc.l[r], sc.acc.data() + r * a.Dv, a.Dv);
      sc.mblk[r * (nkb + 1) + jb] = sc.m[r];  // the maximum this block's weights are relative to
    }
    // acc (rows x Dv) += p (rows x n) . v_block (n x Dv)
    gemm('N', a.Dv, rows, n, v + j0 * a.vs[2], a.vs[2], sb, ld, T(1), sc.acc.data(), a.Dv);
  }
  T* out = a.out + x * a.os[0] + y * a.os[1] + i0 * a.os[2];
  T* lse = a.lse + (x * a.Y + y) * a.Lq + i0;
  for (int64_t r = 0; r < rows; ++r)
    finish_row(sc.acc.data() + r * a.Dv, sc.m[r], sc.l[r], T(0), a.Dv, out + r * a.os[2], lse + r);
  // mass[j] += sum_r p_rj * exp(m_r,block(j) - m_r) / l_r: one GEMV per key block over the kept strip
  T* mass = a.mass + (x * a.Y + y) * a.Lk;
  for (int64_t j0 = 0, jb = 0; j0 < end; j0 += kBlockK, ++jb) {
    const int64_t n = std::min(kBlockK, end - j0);
    for (int64_t r = 0; r < rows; ++r) {
      const T mb = sc.mblk[r * (nkb + 1) + jb];
      sc.w[r] = sc.l[r] > 0 && mb != ninf ? std::exp(mb - sc.m[r]) / sc.l[r] : T(0);
    }
    gemm('N', n, 1, rows, sc.s.get() + j0, ld, sc.w.data(), rows, T(1), mass + j0, n);
  }
}

template <typename T>
void run(Args<T>& a) {
  const int64_t nblocks = (a.Lq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, a.X * a.Y, 1, [&](int64_t begin, int64_t stop) {
    attnzoo_flash::SequentialBlas sequential;
    Scratch<T> sc(std::min(kBlockQ, a.Lq), a.Lk, a.Dv);
    for (int64_t xy = begin; xy < stop; ++xy)
      for (int64_t b = 0; b < nblocks; ++b)
        block(a, xy / a.Y, xy % a.Y, b * kBlockQ, std::min(a.Lq, (b + 1) * kBlockQ), sc);
  });
}

}  // namespace

// q (X, Y, Lq, D), k (X, Y, Lk, D), v (X, Y, Lk, Dv), bias: additive (X, Y, Lk) with any strides, or empty;
// returns out (X, Y, Lq, Dv), lse (X, Y, Lq) and mass (X, Y, Lk) in q's dtype (float32 or float64)
std::vector<at::Tensor> mass_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& bias, double scale, bool causal,
                                       int64_t offset) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "mass_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "mass_attention: unit last strides");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "mass_attention: dtypes");
  const int64_t X = q.size(0), Y = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == X && k.size(1) == Y && v.size(0) == X && v.size(1) == Y && v.size(2) == Lk,
              "mass_attention: shapes");
  auto out = at::empty({X, Y, Lq, Dv}, q.options());
  auto lse = at::empty({X, Y, Lq}, q.options());
  auto mass = at::zeros({X, Y, Lk}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mass_attention", [&] {
    Args<scalar_t> a{};
    a.q = q.data_ptr<scalar_t>();
    a.k = k.data_ptr<scalar_t>();
    a.v = v.data_ptr<scalar_t>();
    a.bias = nullptr;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 3 && bias->scalar_type() == q.scalar_type() && bias->size(0) == X &&
                      bias->size(1) == Y && bias->size(2) == Lk,
                  "mass_attention: bias");
      a.bias = bias->data_ptr<scalar_t>();
      for (int i = 0; i < 3; ++i) a.bs[i] = bias->stride(i);
    }
    a.out = out.data_ptr<scalar_t>();
    a.lse = lse.data_ptr<scalar_t>();
    a.mass = mass.data_ptr<scalar_t>();
    a.X = X, a.Y = Y, a.Lq = Lq, a.Lk = Lk, a.D = D, a.Dv = Dv;
    operand_strides(q, D, a.qs, "mass_attention", "q");
    operand_strides(k, D, a.ks, "mass_attention", "k");
    operand_strides(v, Dv, a.vs, "mass_attention", "v");
    operand_strides(out, Dv, a.os, "mass_attention", "out");
    a.scale = static_cast<scalar_t>(scale);
    a.causal = causal;
    a.offset = offset;
    if (Lq > 0 && Lk > 0) run(a);
  });
  return {out, lse, mass};
}

TORCH_LIBRARY(attnzoo_mass, m) { m.def("mass_attention", &mass_attention); }
