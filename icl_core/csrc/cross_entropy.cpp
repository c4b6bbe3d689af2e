// The training loss's softmax step for CPUs with AVX-512, bf16 logits in, bf16 gradient out.
//
// For a chunk of rows of logits x (R x V, bf16) and their targets t (R, int64), one pass per row:
//   m = max_j x_j,  e_j = 2^((x_j - m) log2 e),  s = sum_j e_j    (fp32)
//   loss_r = m + log(s) - x_t                                      (fp32: -log softmax(x)_t)
//   g_j = e_j / s * scale,   g_t = (e_t / s - 1) * scale            (fp32, rounded to bf16)
// Returns (sum_r loss_r, g), or with softmax_cross_entropy_grad_ (what the trainer calls) g written
// over x, each row's logits read whole before its gradient is written. The same quantities as icl_core.model._LinearCrossEntropy's torch ops
// (fp32 log-softmax of the bf16 logits, its exp, minus the one-hot, times 1/N, cast to bf16);
// what differs: one exp per logit instead of two (the softmax is kept from the sum's pass, in
// cache), an exponential within 1.4 ulp (avx512_bf16.h: exp2_nonpos; terms below 2^-126 count as
// 2^-126, not 0) instead of inductor's 20-ulp one, and one pass
// over the row's 8 KB instead of several kernels' passes over the (R x V) chunk.
// Rows are independent and each is done on one thread in a fixed order; the row losses are summed
// in row order afterwards, so the results are bitwise repeatable for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx512_bf16.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace icl_fused;

void softmax_grad_row(const bf16* x, int64_t V, int64_t t, float scale, float* e, bf16* g, float* loss) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < V; j += 16) mx = _mm512_max_ps(mx, bf16x16_to_f32(x + j));
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 mv = _mm512_set1_ps(m), l2e = _mm512_set1_ps(kLog2e);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= V; j += 32) {  // two independent chains: the exp's latency, not its throughput, bounds one
    __m512 a = exp2_nonpos(_mm512_mul_ps(_mm512_sub_ps(bf16x16_to_f32(x + j), mv), l2e));
    __m512 b = exp2_nonpos(_mm512_mul_ps(_mm512_sub_ps(bf16x16_to_f32(x + j + 16), mv), l2e));
    _mm512_storeu_ps(e + j, a);
    _mm512_storeu_ps(e + j + 16, b);
    s0 = _mm512_add_ps(s0, a);
    s1 = _mm512_add_ps(s1, b);
  }
  for (; j < V; j += 16) {
    __m512 a = exp2_nonpos(_mm512_mul_ps(_mm512_sub_ps(bf16x16_to_f32(x + j), mv), l2e));
    _mm512_storeu_ps(e + j, a);
    s0 = _mm512_add_ps(s0, a);
  }
  const float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  const float xt = static_cast<float>(c10::BFloat16(x[t], c10::BFloat16::from_bits()));
  *loss = m + std::log(s) - xt;
  const float inv_s = 1.0f / s;
  const __m512 c = _mm512_set1_ps(inv_s * scale);
  for (int64_t k = 0; k < V; k += 16) store_bf16x16(g + k, _mm512_mul_ps(_mm512_loadu_ps(e + k), c));
  g[t] = c10::BFloat16((e[t] * inv_s - 1.0f) * scale).x;  // round to nearest even
}

// The logits' and targets' checks, one clear line each; returns the targets, contiguous.
at::Tensor checked_targets(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kBFloat16 && logits.dim() == 2 &&
                  logits.is_contiguous() && logits.size(1) % 16 == 0,
              "fused cross-entropy: logits must be a contiguous (rows, V) bf16 CPU tensor with V a multiple of 16");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0),
              "fused cross-entropy: targets must be an int64 CPU vector with one entry per row of logits");
  const int64_t R = logits.size(0), V = logits.size(1);
  at::Tensor tg = targets.contiguous();
  const int64_t* t = tg.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(t[r] >= 0 && t[r] < V, "fused cross-entropy: target ", t[r], " at row ", r, " outside [0, ", V, ")");
  return tg;
}

// The rows' softmax step, each row's gradient written to out (out may be the logits themselves: a row
// is read whole before its gradient is written); returns the rows' loss sum, added in row order.
float softmax_rows(const at::Tensor& logits, const at::Tensor& targets, double scale, bf16* out) {
  at::Tensor tg = checked_targets(logits, targets);
  const int64_t R = logits.size(0), V = logits.size(1);
  const int64_t* t = tg.data_ptr<int64_t>();
  std::vector<float> row_loss(R);
  const bf16* x = reinterpret_cast<const bf16*>(logits.data_ptr<at::BFloat16>());
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(V);
    for (int64_t r = r0; r < r1; ++r) softmax_grad_row(x + r * V, V, t[r], sc, e.data(), out + r * V, &row_loss[r]);
  });
  float total = 0.0f;
  for (int64_t r = 0; r < R; ++r) total += row_loss[r];
  return total;
}

}  // namespace

// logits: (R, V) bf16, V a multiple of 16; targets: (R,) int64 in [0, V). Returns (loss sum (fp32
// scalar), gradient (R, V) bf16).
std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_grad(const at::Tensor& logits, const at::Tensor& targets,
                                                              double scale) {
  at::Tensor g = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const float total = softmax_rows(logits, targets, scale, reinterpret_cast<bf16*>(g.data_ptr()));
  return {at::scalar_tensor(total, logits.options().dtype(at::kFloat)), g};
}

// As softmax_cross_entropy_grad, the gradient written over the logits: one (R x V) bf16 buffer instead
// of two in cache between the logits' product and the gradient's two products. Returns the loss sum.
at::Tensor softmax_cross_entropy_grad_(at::Tensor& logits, const at::Tensor& targets, double scale) {
  const float total = softmax_rows(logits, targets, scale, reinterpret_cast<bf16*>(logits.data_ptr()));
  return at::scalar_tensor(total, logits.options().dtype(at::kFloat));
}

TORCH_LIBRARY_FRAGMENT(icl_fused, m) {
  m.def("softmax_cross_entropy_grad(Tensor logits, Tensor targets, float scale) -> (Tensor, Tensor)");
  m.def("softmax_cross_entropy_grad_(Tensor(a!) logits, Tensor targets, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(icl_fused, CPU, m) {
  m.impl("softmax_cross_entropy_grad", &softmax_cross_entropy_grad);
  m.impl("softmax_cross_entropy_grad_", &softmax_cross_entropy_grad_);
}
