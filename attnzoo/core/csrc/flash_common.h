// Pieces shared by attnzoo's flash-style CPU extensions (capped_attention.cpp, blocksparse_attention.cpp,
// mass_attention.cpp, band_backward.cpp, block_backward.cpp): the operands' strides for BLAS, BLAS GEMMs
// (libtorch_cpu exports sgemm_/dgemm_, MKL), single-threaded BLAS inside a work item, a vectorisable exp and the
// online-softmax step.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
// MKL's per-thread thread count (libtorch_cpu exports it where torch uses MKL; weak: absent elsewhere)
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // mkl_service.h's C name
}

namespace attnzoo_flash {

// Opened at the top of every at::parallel_for body: this thread's BLAS calls run on this thread while in
// scope (MKL; other BLAS builds: a no-op). The extensions are built with -fopenmp (core/cpp.py), so the work
// items run on torch's threads; MKL would otherwise also thread each small GEMM of an item itself (2 items x
// 2 MKL threads on 2 cores), differently once torch.set_num_threads has switched its dynamic mode off. With
// it, an item's arithmetic and its order are fixed, and the results do not depend on the thread count.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);  // 0: back to the global setting
  }
};

// the strides (x, y, row) of a 4-D operand whose rows (dim 2) of `row` elements have a unit last stride, as the
// kernels index it: a size-1 dimension's stride is 0 (it is only ever indexed at 0; broadcast views may carry
// any stride there), and the row stride is a BLAS leading dimension: at least a row (a lone row's own stride is
// arbitrary, so it becomes `row`). Refuses rows that overlap (an expanded or too-narrow row stride).
inline void operand_strides(const at::Tensor& t, int64_t row, int64_t s[3], const char* op, const char* name) {
  for (int i = 0; i < 2; ++i) s[i] = t.size(i) == 1 ? 0 : t.stride(i);
  s[2] = t.size(2) > 1 ? t.stride(2) : row;
  TORCH_CHECK(s[2] >= row, op, ": the rows of ", name, " must not overlap (row stride ", t.stride(2), " < ", row,
              ")");
}

// column-major C (m x n) = op(A) (m x k) * B (k x n) + beta * C
inline void gemm(char ta, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc) {
  const char tb = 'N';
  const float one = 1.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, int m, int n, int k, const double* a, int lda, const double* b, int ldb, double beta,
                 double* c, int ldc) {
  const char tb = 'N';
  const double one = 1.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

// column-major C (m x n) += A (m x k) * B^T, B stored (n x k): the backward kernels' updates dV += P^T dO and
// dK += dS^T Q from row-major tiles
inline void gemm_nt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const char ta = 'N', tb = 'T';
  const float one = 1.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &one, c, &ldc);
}
inline void gemm_nt(int m, int n, int k, const double* a, int lda, const double* b, int ldb, double* c, int ldc) {
  const char ta = 'N', tb = 'T';
  const double one = 1.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &one, c, &ldc);
}

// The recomputing backward kernels' (band_backward.cpp, block_backward.cpp) shared steps.
// Their operands checked: 4-D q, out, d_out (B, Hq, Nq, D|Dv), k, v (B, Hkv, Nk, D|Dv) with unit last strides and
// one dtype, lse and d_lse (optional) (B, Hq, Nq) contiguous.
inline void check_backward_operands(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const at::Tensor& d_out, const at::Tensor& lse,
                                    const std::optional<at::Tensor>& d_lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && out.dim() == 4 && d_out.dim() == 4, op,
              ": 4-D q, k, v, out, d_out");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1 && d_out.stride(3) == 1,
              op, ": unit last strides");
  const bool has_dlse = d_lse.has_value() && d_lse->defined();
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && out.scalar_type() == dtype &&
                  d_out.scalar_type() == dtype && lse.scalar_type() == dtype &&
                  (!has_dlse || d_lse->scalar_type() == dtype), op, ": one dtype");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Nk &&
                  k.size(3) == q.size(3) && out.sizes() == at::IntArrayRef({B, Hq, Nq, Dv}) &&
                  d_out.sizes() == out.sizes(), op, ": shapes");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == B * Hq * Nq &&
                  (!has_dlse || (d_lse->is_contiguous() && d_lse->numel() == B * Hq * Nq)), op,
              ": lse, d_lse (B, Hq, Nq) contiguous");
}

// The backward kernels' gradients: dq uninitialised (every row of it is written), dk and dv zeroed (accumulated)
inline std::vector<at::Tensor> backward_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {at::empty(q.sizes(), q.options()), at::zeros(k.sizes(), q.options()),
          at::zeros({k.size(0), k.size(1), k.size(2), v.size(3)}, q.options())};
}

// The operands both backward kernels share, into their Args `a` (either kernel's: the fields below): the data of
// q, k, v, out, d_out, lse, d_lse (nullptr when not given), the key padding pad (checked: (B, Nk) bool contiguous;
// nullptr when not given), the gradients g = backward_grads(q, k, v), the sizes B, Hq, Hkv, Nq, Nk, D, Dv and the
// operands' strides qs, ks, vs, os, dos. After check_backward_operands.
template <typename T, typename A>
inline void backward_operands(A& a, const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& d_out, const at::Tensor& lse,
                              const std::optional<at::Tensor>& d_lse, const std::optional<at::Tensor>& pad,
                              const std::vector<at::Tensor>& g) {
  a.q = q.data_ptr<T>(), a.k = k.data_ptr<T>(), a.v = v.data_ptr<T>();
  a.out = out.data_ptr<T>(), a.dout = d_out.data_ptr<T>();
  a.lse = lse.data_ptr<T>(), a.dlse = d_lse.has_value() && d_lse->defined() ? d_lse->data_ptr<T>() : nullptr;
  a.B = q.size(0), a.Hq = q.size(1), a.Hkv = k.size(1), a.Nq = q.size(2), a.Nk = k.size(2), a.D = q.size(3);
  a.Dv = v.size(3);
  a.pad = nullptr;
  if (pad.has_value() && pad->defined()) {
    TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 && pad->size(0) == a.B &&
                    pad->size(1) == a.Nk, op, ": pad (B, Nk) bool");
    a.pad = pad->data_ptr<bool>();
  }
  a.dq = g[0].data_ptr<T>(), a.dk = g[1].data_ptr<T>(), a.dv = g[2].data_ptr<T>();
  operand_strides(q, a.D, a.qs, op, "q");
  operand_strides(k, a.D, a.ks, op, "k");
  operand_strides(v, a.Dv, a.vs, op, "v");
  operand_strides(out, a.Dv, a.os, op, "out");
  operand_strides(d_out, a.Dv, a.dos, op, "d_out");
}

// One query row of a backward tile packed from the kernel's operands `a` (either kernel's Args: q, out, dout with
// their strides qs, os, dos, lse, dlse (nullptr: none), Hq, Nq, D, Dv, scale): query head hq at position i of batch
// row b. q * scale into qp (D), dO into gp (Dv); its lse into lse_r and its delta = rowsum(dO * out) - d_lse into
// delta_r.
template <typename A, typename T>
inline void pack_grad_row(const A& a, int64_t b, int64_t hq, int64_t i, T* qp, T* gp, T& lse_r, T& delta_r) {
  const T* qr = a.q + b * a.qs[0] + hq * a.qs[1] + i * a.qs[2];
  const T* gr = a.dout + b * a.dos[0] + hq * a.dos[1] + i * a.dos[2];
  const T* orow = a.out + b * a.os[0] + hq * a.os[1] + i * a.os[2];
  for (int64_t d = 0; d < a.D; ++d) qp[d] = qr[d] * a.scale;
  std::copy(gr, gr + a.Dv, gp);
  T dot = 0;
  const int64_t Dv = a.Dv;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < Dv; ++d) dot += gr[d] * orow[d];
  const int64_t e = (b * a.Hq + hq) * a.Nq + i;
  lse_r = a.lse[e];
  delta_r = a.dlse ? dot - a.dlse[e] : dot;
}

// A row tile's walk over its key runs [first, second) (the block kernel's forward and backward): the keys every row
// of the tile sees whole (all of them; with `causal` those up to the tile's first position p_lo) gathered as pieces
// of chunks of up to `cols` keys (`flush()` reads the chunk when it is full, or after each piece with
// `flush_each`, and once at the end), the rest of each run (the causal diagonal, up to the tile's last position
// p_hi) read in place in chunks of up to `cols` keys: `in_place(j0, n)`.
template <typename Flush, typename InPlace>
inline void walk_runs(const std::vector<std::pair<int64_t, int64_t>>& runs, bool causal, int64_t p_lo, int64_t p_hi,
                      int64_t cols, bool flush_each, std::vector<std::pair<int64_t, int64_t>>& pieces,
                      int64_t& packed, Flush&& flush, InPlace&& in_place) {
  for (const auto& run : runs) {
    const int64_t end = causal ? std::min(run.second, p_hi + 1) : run.second;
    const int64_t whole_end = causal ? std::min(end, p_lo + 1) : end;  // keys before it: every row sees them
    for (int64_t j0 = run.first; j0 < whole_end;) {
      const int64_t n = std::min(whole_end - j0, cols - packed);
      pieces.emplace_back(j0, j0 + n);
      packed += n;
      j0 += n;
      if (packed == cols || flush_each) flush();
    }
    for (int64_t j0 = std::max(run.first, whole_end); j0 < end; j0 += cols) in_place(j0, std::min(cols, end - j0));
  }
  flush();
}

// A row's score gradients in place over n columns: dS = P (dP - delta), times the soft cap's slope sl (nullptr:
// none; columns with P = 0 may hold an older slope: finite, so 0 either way)
template <typename T>
inline void grad_scores(T* ds, const T* p, const T* sl, T delta, int64_t n) {
  if (sl) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) ds[c] = p[c] * (ds[c] - delta) * sl[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) ds[c] = p[c] * (ds[c] - delta);
  }
}

// exp for float rows: Cephes' polynomial on a range-reduced argument, written so the loops vectorise (no
// library call: rounding by the 1.5 * 2^23 trick); exact 0 below -87.3 (so exp(-inf) = 0), finite up to 88.3.
// Always inlined: a call cannot vectorise, and GCC stopped inlining it into the block kernel's many row-pass
// instantiations (its soft cap ran one scalar call per score: 2x the kernel's time; 1.1x inlined).
// exp_in_range: x in [-87.3, 88.3] (no range handling), the polynomial times 2^n
__attribute__((always_inline)) inline float exp_in_range(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
__attribute__((always_inline)) inline float fast_exp(float x) {
  const bool zero = x < -87.3f;
  const float r = exp_in_range(x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x));
  return zero ? 0.0f : r;
}
inline double fast_exp(double x) { return std::exp(x); }
// exp clamped to [e^-87.3, e^88.3] (~1.2e-38 below, not 0) for finite x: fast_exp without its blend of 0 (the
// block kernel's one-pass softmax step, which checks for overflow itself: 8 % faster)
__attribute__((always_inline)) inline float exp_clamped(float x) {
  return exp_in_range(x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x));
}
inline double exp_clamped(double x) { return std::exp(x); }

// Column c of a row's scaled score x with the distance bias br (BIAS) and then the soft cap cap * tanh(x / cap)
// (CAP; written as cap + cap * u with u = tanh - 1 = -2 / (exp(2x / cap) + 1), and its slope 1 - tanh^2 = -u (2 + u)
// into sl[c], both exact near saturation; two_over_cap = 2 / cap): the backward kernels' recomputed scores.
// Always inlined into their vectorised column loops.
template <typename T, bool BIAS, bool CAP>
__attribute__((always_inline)) inline T modified_score(T x, const T* br, T* sl, int64_t c, T cap, T two_over_cap) {
  if constexpr (BIAS) x += br[c];
  if constexpr (CAP) {
    const T u = T(-2) / (fast_exp(x * two_over_cap) + T(1));
    sl[c] = -u * (T(2) + u);
    x = cap + cap * u;
  }
  return x;
}

// one row's online-softmax step over a block of n logits `sr` whose first `vis` may be visible (-inf hides
// one) and whose maximum is `mx`: sr becomes the block's weights (0 past vis, all 0 while the row has seen no
// key), the row's maximum m and sum l are updated and its accumulated output `acc` (Dv) rescaled
template <typename T>
inline void softmax_step(T* sr, int64_t vis, int64_t n, T mx, T& m, T& l, T* acc, int64_t Dv) {
  const T m_new = std::max(m, mx);
  if (m_new == -std::numeric_limits<T>::infinity()) {  // nothing visible yet
    std::fill(sr, sr + n, T(0));
    return;
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < vis; ++c) {
    const T p = fast_exp(sr[c] - m_new);
    sr[c] = p;
    sum += p;
  }
  std::fill(sr + vis, sr + n, T(0));
  const T alpha = m == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  if (alpha != T(1))
    for (int64_t d = 0; d < Dv; ++d) acc[d] *= alpha;
}

// a row's result from its accumulated output, maximum and sum (logits shifted by `shift`): out and lse,
// (0, -inf) where it saw no key
template <typename T>
inline void finish_row(const T* acc, T m, T l, T shift, int64_t Dv, T* out, T* lse) {
  if (l > 0) {
    const T inv = T(1) / l;
    for (int64_t d = 0; d < Dv; ++d) out[d] = acc[d] * inv;
    *lse = m + std::log(l) + shift;
  } else {
    for (int64_t d = 0; d < Dv; ++d) out[d] = T(0);
    *lse = -std::numeric_limits<T>::infinity();
  }
}

}  // namespace attnzoo_flash
