// Shared AVX-512 helpers of the fused CPU kernels (causal_attention.cpp, cross_entropy.cpp, bias_gelu.cpp,
// rope_qkv.cpp): bf16 <-> fp32 conversions, exponentials for non-positive arguments, RoPE's rotation of a row.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace icl_fused {

using bf16 = uint16_t;

constexpr float kLog2e = 1.44269504088896341f;

inline __m512 bf16x16_to_f32(const bf16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline void store_bf16x16(bf16* p, __m512 x) {  // round to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// exp(x) for x <= 0 (the GELU kernel's exp(-h^2 / 2), bias_gelu.cpp): range reduction x = n ln2 + r, |r| <= ln2/2, Cephes'
// single-precision polynomial for e^r, result scaled by 2^n; exactly 0 below -87.3 (and for -inf).
// At most 1.24 ulp from exp in double, over every 7th float in [-87, 0] (measured, 2026-12-03).
inline __m512 exp_nonpos(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  y = _mm512_scalef_ps(y, n);
  return _mm512_maskz_mov_ps(~under, y);
}

// 2^t for t <= 0 (softmax arguments in base 2: callers multiply by log2(e), folded into any scale
// they apply anyway): t = n + f with n = round(t), |f| <= 1/2, a degree-5 polynomial for 2^f (fitted
// to the relative error with its constant term exactly 1, so 2^0 = 1), scaled by 2^n. Below -126 the
// result is 2^-126 (the smallest normal float), not 0: a caller that needs exact zeros (masked
// positions) masks them. 9 vector operations against exp_nonpos's 16, which the two softmax kernels
// used until the fifteenth pass (benchmarks/cpu_trainer.md); at most 1.7e-7 relative error (1.4 ulp
// of 1) from 2^t in double over f in [-1/2, 1/2] (these fp32 operations emulated in numpy; the loss
// kernel's test checks it end to end).
inline __m512 exp2_nonpos(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.326472731307149e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671512991189957e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550733581185341e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242426872253e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470036506653e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// RoPE (rope_qkv.cpp, and causal_attention.cpp's attention_qkv): one row of D (a multiple of 32)
// bf16 values: x * cos + swap_halves(x) * sin (the rotation), or with
// Transpose its transpose g * cos + swap_halves(g * sin) (the rotation's backward).
template <bool Transpose>
inline void rope_row(const bf16* x, const bf16* c, const bf16* s, int64_t D, bf16* out) {
  const int64_t h = D / 2;
  for (int64_t j = 0; j < D; j += 16) {
    const int64_t partner = j < h ? j + h : j - h;
    __m512 y = _mm512_add_ps(_mm512_mul_ps(bf16x16_to_f32(x + j), bf16x16_to_f32(c + j)),
                             _mm512_mul_ps(bf16x16_to_f32(x + partner), bf16x16_to_f32(s + (Transpose ? partner : j))));
    store_bf16x16(out + j, y);
  }
}

}  // namespace icl_fused
