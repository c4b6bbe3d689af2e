// Queries, keys and values out of the attention's fused projection, with RoPE, for the fused
// attention (causal_attention.cpp): CPUs with AVX-512, bf16 in and out.
//
// Forward:  qkv (B, T, 3, H, D), the product x W_qkv whose query and key columns are in half-split
//           order (icl_core.model.Attention), cos and sin (T, D) the position tables in that order
//           (sin carrying the rotation's sign):
//             q[b h][t] = q * cos[t] + swap_halves(q) * sin[t]   (fp32, rounded to bf16), k likewise,
//             v[b h][t] = v,
//           each as an (B H, T, D) tensor, the layout the attention kernel reads.
// Backward: dqkv[b, t, 0, h] = dq * cos[t] + swap_halves(dq * sin[t]) (fp32, rounded), dk likewise,
//           dqkv[b, t, 2, h] = dv.
// The same formulas as the compiled torch ops they replace (q * cos + swap_halves(q) * sin on the
// (B, T, H, D) views, transposed to (B, H, T, D)); the compiled backward of that slicing wrote the
// (B, T, 3, H, D) gradient through masks and blends, ~0.7 ns per value on the laptop's CPU.
// Every output value is computed once by one thread: bitwise repeatable for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx512_bf16.h"

#include <cstdint>

namespace {

using namespace icl_fused;

// v's rows as they are: D bf16 (a multiple of 32) in 64-byte vectors, inline (a memcpy call per row before)
inline void copy_row(const bf16* src, int64_t D, bf16* dst) {
  for (int64_t j = 0; j < D; j += 32) _mm512_storeu_si512(dst + j, _mm512_loadu_si512(src + j));
}

void check_tables(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t D) {
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) >= T && t->size(1) == D,
                "fused RoPE: cos and sin must be contiguous bf16 CPU tables of at least (T, d_head)");
}

const bf16* bits(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }
bf16* bits_mut(at::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// qkv: (B, T, 3, H, D) bf16, D a multiple of 32. Returns (q, k, v), each (B H, T, D) bf16.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_split_qkv(const at::Tensor& qkv, const at::Tensor& cos,
                                                              const at::Tensor& sin) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kBFloat16 && qkv.dim() == 5 && qkv.size(2) == 3 &&
                  qkv.is_contiguous() && qkv.size(4) % 32 == 0,
              "fused RoPE: qkv must be a contiguous (B, T, 3, H, d_head) bf16 CPU tensor, d_head a multiple of 32");
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  check_tables(cos, sin, T, D);
  at::Tensor q = at::empty({B * H, T, D}, qkv.options()), k = at::empty_like(q), v = at::empty_like(q);
  const bf16 *src = bits(qkv), *c = bits(cos), *s = bits(sin);
  bf16 *qd = bits_mut(q), *kd = bits_mut(k), *vd = bits_mut(v);
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = b T + t
      const int64_t b = r / T, t = r % T;
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t o = ((b * H + hh) * T + t) * D;
        const bf16* row = src + r * 3 * H * D + hh * D;
        rope_row<false>(row, c + t * D, s + t * D, D, qd + o);
        rope_row<false>(row + H * D, c + t * D, s + t * D, D, kd + o);
        copy_row(row + 2 * H * D, D, vd + o);
      }
    }
  });
  return {q, k, v};
}

// dq, dk, dv: (B H, T, D) bf16. Returns dqkv (B, T, 3, H, D) bf16.
at::Tensor rope_split_qkv_bwd(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                              const at::Tensor& sin, int64_t H) {
  for (const at::Tensor* t : {&dq, &dk, &dv})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 3 && t->is_contiguous() &&
                    t->sizes() == dq.sizes() && H > 0 && t->size(0) % H == 0 && t->size(2) % 32 == 0,
                "fused RoPE: the gradients must be contiguous (B H, T, d_head) bf16 CPU tensors");
  const int64_t B = dq.size(0) / H, T = dq.size(1), D = dq.size(2);
  check_tables(cos, sin, T, D);
  at::Tensor dqkv = at::empty({B, T, 3, H, D}, dq.options());
  const bf16 *gq = bits(dq), *gk = bits(dk), *gv = bits(dv), *c = bits(cos), *s = bits(sin);
  bf16* out = bits_mut(dqkv);
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t o = ((b * H + hh) * T + t) * D;
        bf16* row = out + r * 3 * H * D + hh * D;
        rope_row<true>(gq + o, c + t * D, s + t * D, D, row);
        rope_row<true>(gk + o, c + t * D, s + t * D, D, row + H * D);
        copy_row(gv + o, D, row + 2 * H * D);
      }
    }
  });
  return dqkv;
}

TORCH_LIBRARY_FRAGMENT(icl_fused, m) {
  m.def("rope_split_qkv(Tensor qkv, Tensor cos, Tensor sin) -> (Tensor, Tensor, Tensor)");
  m.def("rope_split_qkv_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin, int H) -> Tensor");
}

TORCH_LIBRARY_IMPL(icl_fused, CPU, m) {
  m.impl("rope_split_qkv", &rope_split_qkv);
  m.impl("rope_split_qkv_bwd", &rope_split_qkv_bwd);
}
