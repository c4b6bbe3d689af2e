// The MLP's bias + GELU for CPUs with AVX-512, bf16 product in, bf16 activation out.
//
// Forward:  h = m + b (fp32; m the bf16 product x W_in, b the fp32 bias),
//           a = h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2))      (rounded to bf16 for the next product)
// Backward: dh = da * (Phi(h) + h phi(h)), phi(h) = exp(-h^2 / 2) / sqrt(2 pi)     (fp32)
//           dm = dh (rounded to bf16), db = sum over rows of dh (fp32, in row order)
// The same formulas as F.gelu(x @ W_in + b_in) under bf16 autocast (exact GELU, fp32 between the
// products) and the same erf: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), PyTorch's vectorised
// CPU erf, whose exp(-x^2) here is exp(-h^2 / 2), the exp phi needs, so one exp serves both.
// What differs from the compiled torch ops: the backward is one pass (the compiled graph wrote dh
// in fp32, summed its columns and cast it in three passes over (rows x d_mlp), and recomputed the
// forward GELU for W_out's gradient; here the forward's bf16 output is kept instead).
// Every column's bias gradient is summed in row order on one thread: bitwise repeatable for any
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx512_bf16.h"

#include <cstdint>
#include <vector>

namespace {

using namespace icl_fused;

// Phi(h) and exp(-h^2 / 2) for 16 values of h.
inline void gelu_parts(__m512 h, __m512& cdf, __m512& e) {
  const __m512 neg_zero = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
  const __m512 x = _mm512_mul_ps(h, _mm512_set1_ps(0.70710678118654752f));
  const __m512 sign = _mm512_and_ps(neg_zero, x);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), _mm512_abs_ps(x), one));
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
  e = exp_nonpos(_mm512_xor_ps(neg_zero, _mm512_mul_ps(x, x)));  // exp(-x^2) = exp(-h^2 / 2)
  const __m512 erf = _mm512_xor_ps(sign, _mm512_fmadd_ps(_mm512_xor_ps(neg_zero, _mm512_mul_ps(e, t)), r, one));
  cdf = _mm512_mul_ps(_mm512_add_ps(erf, one), _mm512_set1_ps(0.5f));
}

void check(const at::Tensor& m, const at::Tensor& b) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBFloat16 && m.dim() == 2 && m.is_contiguous() &&
                  m.size(1) % 16 == 0,
              "fused bias + GELU: the product must be a contiguous (rows, d_mlp) bf16 CPU tensor, d_mlp a multiple of 16");
  TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == m.size(1) &&
                  b.is_contiguous(),
              "fused bias + GELU: the bias must be a contiguous fp32 CPU vector of d_mlp entries");
}

}  // namespace

// m: (R, F) bf16, b: (F,) fp32. Returns GELU(m + b) as (R, F) bf16.
at::Tensor bias_gelu_fwd(const at::Tensor& m, const at::Tensor& b) {
  check(m, b);
  const int64_t R = m.size(0), F = m.size(1);
  at::Tensor a = at::empty({R, F}, m.options());
  const bf16* md = reinterpret_cast<const bf16*>(m.data_ptr<at::BFloat16>());
  const float* bd = b.data_ptr<float>();
  bf16* ad = reinterpret_cast<bf16*>(a.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < F; j += 16) {
        __m512 h = _mm512_add_ps(bf16x16_to_f32(md + r * F + j), _mm512_loadu_ps(bd + j)), cdf, e;
        gelu_parts(h, cdf, e);
        store_bf16x16(ad + r * F + j, _mm512_mul_ps(h, cdf));
      }
  });
  return a;
}

// da: (R, F) bf16 (the activation's gradient), m, b as the forward's. Returns (dm (R, F) bf16, db (F,) fp32).
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& da, const at::Tensor& m, const at::Tensor& b) {
  check(m, b);
  TORCH_CHECK(da.sizes() == m.sizes() && da.scalar_type() == at::kBFloat16 && da.is_contiguous() && da.device().is_cpu(),
              "fused bias + GELU: the gradient must be a contiguous bf16 CPU tensor shaped as the product");
  const int64_t R = m.size(0), F = m.size(1);
  at::Tensor dm = at::empty({R, F}, m.options());
  at::Tensor db = at::zeros({F}, b.options());
  const bf16* md = reinterpret_cast<const bf16*>(m.data_ptr<at::BFloat16>());
  const bf16* gd = reinterpret_cast<const bf16*>(da.data_ptr<at::BFloat16>());
  const float* bd = b.data_ptr<float>();
  bf16* dmd = reinterpret_cast<bf16*>(dm.data_ptr<at::BFloat16>());
  float* dbd = db.data_ptr<float>();
  const __m512 inv_sqrt_2pi = _mm512_set1_ps(0.3989422804014327f);
  // columns split among threads (16 at a time), every row of a column on one thread, in order
  at::parallel_for(0, F / 16, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j = 16 * c;
        __m512 h = _mm512_add_ps(bf16x16_to_f32(md + r * F + j), _mm512_loadu_ps(bd + j)), cdf, e;
        gelu_parts(h, cdf, e);
        __m512 dh = _mm512_mul_ps(bf16x16_to_f32(gd + r * F + j), _mm512_fmadd_ps(_mm512_mul_ps(h, e), inv_sqrt_2pi, cdf));
        store_bf16x16(dmd + r * F + j, dh);
        _mm512_storeu_ps(dbd + j, _mm512_add_ps(_mm512_loadu_ps(dbd + j), dh));
      }
  });
  return {dm, db};
}

TORCH_LIBRARY_FRAGMENT(icl_fused, m) {
  m.def("bias_gelu_fwd(Tensor m, Tensor b) -> Tensor");
  m.def("bias_gelu_bwd(Tensor da, Tensor m, Tensor b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(icl_fused, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
}
