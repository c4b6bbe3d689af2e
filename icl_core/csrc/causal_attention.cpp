// Fused causal attention for CPUs with AVX-512 bf16 dot products (avx512_bf16), bf16 in and out.
//
// Forward:  P = softmax(scale * Q K^T + causal mask) (fp32 scores and softmax, P rounded to bf16),
//           O = P V (fp32 accumulation, rounded to bf16).
// Backward: dP = dO V^T (fp32), dS = scale * P * (dP - rowsum(dP * P)) (fp32, rounded to bf16),
//           dQ = dS K, dK = dS^T Q, dV = P^T dO (fp32 accumulation, rounded to bf16).
//
// The same formulas as icl_core.model._CausalAttention; what differs is where the work happens.
// Each (batch x head) slice is done whole while its operands (T x T scores, T x d_head inputs)
// stay in the core's cache, the products skip the blocks above the causal diagonal (half the
// work), and scale, mask, softmax and its backward run on rows just computed rather than as separate
// passes over (N, T, T) tensors in memory. Why it exists: PyTorch 2.13's CPU flash attention has a
// slow backward and flex_attention none on the CPU (benchmarks/cpu_trainer.md, "Ninth pass").
//
// Products: C[r][c] (fp32) += sum_p A[r][2p..2p+1] . B[p][c][0..1] with _mm512_dpbf16_ps, where A is
// row-major bf16 (pairs along the reduction are adjacent) and B is "pair-packed": B[p][c][2], the
// reduction's pairs interleaved per column. Every slice runs in a fixed order on one thread, so
// the results are bitwise repeatable for any number of threads.
//
// On CPUs with AMX (amx_bf16, amx_tile), the same products run on the matrix unit instead (tiles of
// 16 rows x 16 pairs x 16 columns, tdpbf16ps): A row-major and B pair-packed are exactly the tiles'
// layouts, so only the loops differ. AMX accumulates a tile's 16 pairs in its own order, so its
// results differ from the dot-product loop's in the last bits of the fp32 sums (both are fp32
// accumulations of exact bf16 products); each is bitwise repeatable. The softmax and its backward are
// the same code on both paths. ICL_FUSED_AMX=0 (read once per process) or icl_fused::amx(0) keeps the
// dot-product loop (benchmarks/cpu_trainer.md, "Twelfth pass").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <x86intrin.h>

#include "avx512_bf16.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace {

using namespace icl_fused;

// C[R][16*NC] = sum over pairs p in [p0, p1) of A[r][p] (a pair of bf16 as 32 bits) times
// B[p][16*NC] (each 32-bit lane a pair). lda, ldb in 32-bit words; ldc in floats.
template <int R, int NC>
inline void kernel(int p0, int p1, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int p = p0; p < p1; ++p) {
    __m512bh b[NC];
    for (int c = 0; c < NC; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + (int64_t)p * ldb + 16 * c);
    for (int r = 0; r < R; ++r) {
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[(int64_t)r * lda + p]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(C + r * ldc + 16 * c, acc[r][c]);
}

// C[R][0..16*nvec) over pairs [p0, p1): column blocks of 64, then the remaining 16, 32 or 48 in one
// block (R x 1 alone would leave too few independent accumulators to hide the dot product's latency).
template <int R>
inline void row_block(int nvec, int p0, int p1, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C,
                      int ldc) {
  int c = 0;
  for (; c + 4 <= nvec; c += 4) kernel<R, 4>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc);
  switch (nvec - c) {
    case 3: kernel<R, 3>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc); break;
    case 2: kernel<R, 2>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc); break;
    case 1: kernel<R, 1>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc); break;
    default: break;
  }
}

// Pair-pack rows of a row-major (rows x cols) bf16 matrix: out[i/2][c][i%2] = in[i][c] (rows even,
// cols a multiple of 16).
void pack_row_pairs(const bf16* in, int rows, int cols, int ld_in, uint32_t* out, int ld_out) {
  for (int i = 0; i < rows; i += 2) {
    const bf16* a = in + (int64_t)i * ld_in;
    const bf16* b = a + ld_in;
    uint32_t* o = out + (int64_t)(i / 2) * ld_out;
    for (int c = 0; c < cols; c += 16) {
      __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c)));
      __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c)));
      _mm512_storeu_si512(o + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// Transpose 16 rows of 16 32-bit lanes in registers (unpack, then 128-bit lane shuffles).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// Transpose a row-major (rows x cols) matrix of 32-bit words (rows ld_in words apart) into (cols x
// rows), by 16 x 16 blocks (rows and cols multiples of 16).
void transpose32(const uint32_t* in, int rows, int cols, int64_t ld_in, uint32_t* out) {
  __m512 r[16];
  for (int i = 0; i < rows; i += 16)
    for (int c = 0; c < cols; c += 16) {
      for (int k = 0; k < 16; ++k) r[k] = _mm512_castsi512_ps(_mm512_loadu_si512(in + (int64_t)(i + k) * ld_in + c));
      transpose16x16(r);
      for (int k = 0; k < 16; ++k) _mm512_storeu_si512(out + (int64_t)(c + k) * rows + i, _mm512_castps_si512(r[k]));
    }
}

// Pair-pack the transpose: out[p][i] = (in[i][2p], in[i][2p+1]) for a row-major (rows x cols) bf16
// matrix, rows ld_in values apart (rows and cols / 2 multiples of 16): a transpose of 32-bit words.
void pack_transposed(const bf16* in, int rows, int cols, int64_t ld_in, uint32_t* out) {
  transpose32(reinterpret_cast<const uint32_t*>(in), rows, cols / 2, ld_in / 2, out);
}

// out[j][0..D) (bf16, rows ld_out values apart) = C[0..D)[j] for a row-major (D x T) fp32 C; D and T
// multiples of 16.
void store_transposed(const float* C, int D, int T, bf16* out, int64_t ld_out) {
  __m512 r[16];
  for (int d0 = 0; d0 < D; d0 += 16)
    for (int j0 = 0; j0 < T; j0 += 16) {
      for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(C + (int64_t)(d0 + k) * T + j0);
      transpose16x16(r);
      for (int k = 0; k < 16; ++k) store_bf16x16(out + (int64_t)(j0 + k) * ld_out + d0, r[k]);
    }
}

// ---- AMX ----------------------------------------------------------------------------------------

// Whether this CPU has AMX tiles with bf16 products and Linux lets this process use them
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, which oneDNN asks for too); asked once.
bool amx_supported() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool bf16 = d & (1u << 22), tile = d & (1u << 24);
    if (!bf16 || !tile) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

// -1: not decided yet (ICL_FUSED_AMX decides at the first call), 0: dot-product loop, 1: AMX
std::atomic<int> g_amx{-1};

bool amx_on() {
  int m = g_amx.load(std::memory_order_relaxed);
  if (m < 0) {
    const char* e = std::getenv("ICL_FUSED_AMX");
    m = (amx_supported() && !(e && std::strcmp(e, "0") == 0)) ? 1 : 0;
    g_amx.store(m, std::memory_order_relaxed);
  }
  return m == 1;
}

// ---- Section timing (icl_fused::attention_cycles; benchmarks only) ---------------------------------
// Off unless asked: then each thread's time in the products (tile or dot-product loops) and in its
// whole share of the call is summed in time stamp counter ticks, so a profile can count the products
// as matrix work (torch.profiler sees one call per attention pass). Slots: forward products, forward
// threads' total, backward products, backward threads' total.
std::atomic<bool> g_timing{false};
std::atomic<int64_t> g_ticks[4];

struct SectionClock {
  const bool on = g_timing.load(std::memory_order_relaxed);
  const int slot;
  const uint64_t start = on ? __rdtsc() : 0;
  int64_t products = 0;
  explicit SectionClock(int s) : slot(s) {}
  template <class F>
  void product(F&& f) {
    if (!on) { f(); return; }
    const uint64_t t0 = __rdtsc();
    f();
    products += (int64_t)(__rdtsc() - t0);
  }
  ~SectionClock() {
    if (!on) return;
    g_ticks[slot].fetch_add(products, std::memory_order_relaxed);
    g_ticks[slot + 1].fetch_add((int64_t)(__rdtsc() - start), std::memory_order_relaxed);
  }
};

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (16 x 16 fp32); 4: A (16 rows x 16 pairs); 5, 6: B (16 pairs x 16 columns).
// Loaded by each thread before its products, released after.
struct AmxScope {
  AmxScope() {
    TileConfig cfg;
    for (int t = 0; t < 7; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    // GCC's _tile_loadconfig tells the compiler it reads only 8 bytes of the config, so without this
    // barrier the other 56 bytes' stores may be dropped as dead and ldtilecfg faults (it did, once
    // this function's stack frame changed: benchmarks/cpu_trainer.md, "Thirteenth pass")
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
  }
  ~AmxScope() { _tile_release(); }
};

// C[16][16*NC] = sum over pairs p in [p0, p1) (p1 - p0 a multiple of 16) of A[r][p] B[p][..]:
// A row-major in 32-bit pairs (lda words), B pair-packed (ldb words), C fp32 (ldc floats).
template <int NC>
inline void amx_tiles(int p0, int p1, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc) {
  static_assert(NC >= 1 && NC <= 4, "four C tiles");
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  if constexpr (NC > 2) _tile_zero(2);
  if constexpr (NC > 3) _tile_zero(3);
  for (int p = p0; p < p1; p += 16) {
    const uint32_t* b = B + (int64_t)p * ldb;
    _tile_loadd(4, A + p, lda * 4);
    _tile_loadd(5, b, ldb * 4);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NC > 1) { _tile_loadd(6, b + 16, ldb * 4); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (NC > 2) { _tile_loadd(5, b + 32, ldb * 4); _tile_dpbf16ps(2, 4, 5); }
    if constexpr (NC > 3) { _tile_loadd(6, b + 48, ldb * 4); _tile_dpbf16ps(3, 4, 6); }
  }
  _tile_stored(0, C, ldc * 4);
  if constexpr (NC > 1) _tile_stored(1, C + 16, ldc * 4);
  if constexpr (NC > 2) _tile_stored(2, C + 32, ldc * 4);
  if constexpr (NC > 3) _tile_stored(3, C + 48, ldc * 4);
}

// C[16][0..16*ncol) over pairs [p0, p1), in groups of four column tiles.
inline void amx_rows(int ncol, int p0, int p1, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C,
                     int ldc) {
  int c = 0;
  for (; c + 4 <= ncol; c += 4) amx_tiles<4>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc);
  switch (ncol - c) {
    case 3: amx_tiles<3>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc); break;
    case 2: amx_tiles<2>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc); break;
    case 1: amx_tiles<1>(p0, p1, A, lda, B + 16 * c, ldb, C + 16 * c, ldc); break;
    default: break;
  }
}

// pairs [0, n) rounded up to whole tiles of 16 pairs, at most `limit`
inline int whole_tiles(int n, int limit) { return std::min(limit, (n + 15) / 16 * 16); }

// permutexvar index interleaving two rows of 16 bf16 (a vector [a0..a15 | b0..b15]) into pairs:
// [a0, b0, a1, b1, ..., a15, b15], one 32-bit pair per key
inline __m512i pair_interleave_index() {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(idx);
}

// Zeros over [from, to) of a row (both multiples of 16), inline: each slice writes ~400 such spans of
// 0-48 values per pass, a memset call each before
inline void zero_words(uint32_t* p, int from, int to) {
  for (int c = from; c < to; c += 16) _mm512_storeu_si512(p + c, _mm512_setzero_si512());
}
inline void zero_bf16(bf16* p, int from, int to) {
  for (int c = from; c < to; c += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c), _mm256_setzero_si256());
}

// Two rows i, i+1 of P or dS at keys 16c..16c+15 (fp32 a, b), rounded to bf16 in one conversion:
// stored row-major (ra, rb) and as pairs of rows (pp, one 32-bit word per key)
inline void store_row_pair(__m512 a, __m512 b, __m512i pair_idx, bf16* ra, bf16* rb, uint32_t* pp) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // [row i | row i+1]
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ra), _mm512_castsi512_si256(both));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(rb), _mm512_extracti64x4_epi64(both, 1));
  _mm512_storeu_si512(pp, _mm512_permutexvar_epi16(pair_idx, both));
}

// Zeros past a row pair's diagonal vector (its data in the first nv vectors): in the rows up to the
// next multiple of 32 keys, the most that the (T x d_head) products' AMX tiles of 16 pairs read; in
// the pairs up to pcols, the end of the pair's block of 64 keys, the most that the (d_head x T)
// products read
inline void zero_pair_tail(bf16* ra, bf16* rb, uint32_t* pp, int nv, int T, int pcols) {
  const int zr = std::min(T, (16 * nv + 31) / 32 * 32);
  zero_bf16(ra, 16 * nv, zr);
  zero_bf16(rb, 16 * nv, zr);
  zero_words(pp, 16 * nv, pcols);
}

constexpr int RB = 4;   // rows per block of the (T x T) products
static_assert(16 % RB == 0, "a row block lies within one vector of 16 keys");
constexpr int RO = 8;   // rows per block of the (T x d_head) products

void check_inputs(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 3 && t.is_contiguous(),
              "fused causal attention: ", name, " must be a contiguous (N, T, d_head) bf16 CPU tensor");
}

// Where slice n = b heads + h of an operand lives: its rows at base + b bstride + h D + t ld (bf16
// values). (N, T, D) tensors: heads 1, bstride T D, ld D; q, k or v inside the projection's
// (B, T, 3, H, D) output: heads H, bstride 3 T H D, ld 3 H D; O and dO as (B, T, H, D): ld H D.
struct Rows {
  bf16* base;
  int64_t heads, bstride, ld;
  bf16* at(int64_t n, int D) const { return base + (n / heads) * bstride + (n % heads) * D; }
};

Rows contiguous(const at::Tensor& t) {  // an (N, T, D) tensor
  return {reinterpret_cast<bf16*>(t.data_ptr()), 1, t.size(1) * t.size(2), t.size(2)};
}

// RoPE's (T, D) tables in the half-split order (rope_qkv.cpp), or none
struct Rope {
  const bf16* cos = nullptr;
  const bf16* sin = nullptr;
  explicit operator bool() const { return cos != nullptr; }
};

// slice n's queries (or keys) as the products read them: rotated into buf (T x D) with rope (the same
// rows rope_qkv.cpp's rope_split_qkv writes), else in place. Returns the rows and their stride.
inline const bf16* rotated(const Rows& x, int64_t n, int T, int D, const Rope& rope, bf16* buf, int64_t& ld) {
  const bf16* src = x.at(n, D);
  if (!rope) {
    ld = x.ld;
    return src;
  }
  for (int t = 0; t < T; ++t) rope_row<false>(src + t * x.ld, rope.cos + (int64_t)t * D, rope.sin + (int64_t)t * D, D, buf + (int64_t)t * D);
  ld = D;
  return buf;
}

// The forward of N slices: q, k, v in (with rope q and k rotated first, into qr and kr: (N, T, D),
// kept for the backward), O out; P saved by pairs of rows at pd.
void attention_forward(int64_t N, int T, int D, const Rows& q, const Rows& k, const Rows& v, const Rope& rope,
                       const Rows& o, uint32_t* pd, bf16* qr = nullptr, bf16* kr = nullptr) {
  const float scale = 1.0f / std::sqrt((float)D);
  const bool amx = amx_on();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    SectionClock clock(0);
    std::vector<uint32_t> Kt((size_t)T * D / 2), Vp((size_t)T * D / 2);
    std::unique_ptr<bf16[]> Pr(new bf16[(size_t)T * T]);  // the slice's P row-major, for P V
    const __m512i kPairIdx = pair_interleave_index();
    std::vector<float> S((size_t)16 * T), Of((size_t)16 * D);
    const __m512 k2 = _mm512_set1_ps(scale * kLog2e);  // the scale and exp's base change in one product
    std::unique_ptr<AmxScope> tiles(amx ? new AmxScope : nullptr);
    for (int64_t n = begin; n < end; ++n) {
      int64_t ldq, ldk;
      const bf16* Q = rotated(q, n, T, D, rope, rope ? qr + n * T * D : nullptr, ldq);
      const bf16* K = rotated(k, n, T, D, rope, rope ? kr + n * T * D : nullptr, ldk);
      uint32_t* Pn = pd + n * T * T / 2;  // the saved P, pairs of rows: Pn[i/2][j] = (P[i][j], P[i+1][j])
      // scale, mask and softmax of rows i0..i0+RB-1, whose scores (keys up to i0+RB-1) are in Sb
      // (RB rows of T floats); P's rows written as bf16 to Pr and to the saved pairs Pn
      auto softmax_rows = [&](int i0, float* Sb) {
        // the block's RB rows side by side (independent chains for the exp's latency): rows i0..i0+RB-1
        // lie in one vector of 16 keys (RB divides 16), so each holds keys in the same nv vectors
        const int nv = i0 / 16 + 1;
        __m512 mx[RB], m[RB], sum[RB], inv[RB];
        __mmask16 last[RB];
        for (int r = 0; r < RB; ++r) {
          last[r] = (__mmask16)((1u << ((i0 + r) % 16 + 1)) - 1);
          mx[r] = _mm512_set1_ps(-INFINITY);
          sum[r] = _mm512_setzero_ps();
        }
        // each row's max over its raw scores (the scale is positive: scale times it is the scaled
        // scores' max), then e = 2^((s - max) scale log2 e), the masked keys exactly 0
        for (int c = 0; c < nv; ++c)
          for (int r = 0; r < RB; ++r) {
            __m512 x = _mm512_loadu_ps(Sb + (int64_t)r * T + 16 * c);
            if (c == nv - 1) x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), last[r], x);
            mx[r] = _mm512_max_ps(mx[r], x);
          }
        for (int r = 0; r < RB; ++r) m[r] = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
        for (int c = 0; c < nv; ++c)
          for (int r = 0; r < RB; ++r) {
            float* s = Sb + (int64_t)r * T + 16 * c;
            __m512 e = exp2_nonpos(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s), m[r]), k2));
            if (c == nv - 1) e = _mm512_maskz_mov_ps(last[r], e);
            _mm512_storeu_ps(s, e);
            sum[r] = _mm512_add_ps(sum[r], e);
          }
        for (int r = 0; r < RB; ++r) inv[r] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[r]));
        // P's rows by pairs: rounded to bf16 once (two rows in one conversion), stored row-major in
        // Pr for P V and interleaved in the saved P, the layout the backward's dV^T product and dS
        // pass read (benchmarks/cpu_trainer.md, "Fifteenth pass")
        const int pcols = std::min(T, ((i0 + RB + 63) / 64) * 64);  // the backward reads pairs up to here
        for (int r = 0; r < RB; r += 2) {
          const float* sa = Sb + (int64_t)r * T;
          const float* sb = sa + T;
          bf16* ra = Pr.get() + (int64_t)(i0 + r) * T;
          bf16* rb = ra + T;
          uint32_t* pp = Pn + (int64_t)((i0 + r) / 2) * T;
          for (int c = 0; c < nv; ++c)
            store_row_pair(_mm512_mul_ps(_mm512_loadu_ps(sa + 16 * c), inv[r]),
                           _mm512_mul_ps(_mm512_loadu_ps(sb + 16 * c), inv[r + 1]), kPairIdx, ra + 16 * c,
                           rb + 16 * c, pp + 16 * c);
          zero_pair_tail(ra, rb, pp, nv, T, pcols);  // P V reads Pr up to 32 keys, dV^T the pairs up to pcols
        }
      };
      bf16* On = o.at(n, D);
      auto store_rows = [&](int i0, int rows) {  // O's rows i0.. from Of (fp32, D per row)
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < D / 16; ++c) store_bf16x16(On + (i0 + r) * o.ld + 16 * c, _mm512_loadu_ps(Of.data() + r * D + 16 * c));
      };
      pack_transposed(K, T, D, ldk, Kt.data());                 // Kt[p][j] = k[j][2p..2p+1]
      pack_row_pairs(v.at(n, D), T, D, (int)v.ld, Vp.data(), D);  // Vp[j/2][d] = (v[j][d], v[j+1][d])
      const uint32_t* Q32 = reinterpret_cast<const uint32_t*>(Q);
      const int lq = (int)(ldq / 2);
      const uint32_t* P32 = reinterpret_cast<const uint32_t*>(Pr.get());
      if (amx) {
        for (int i0 = 0; i0 < T; i0 += 16) {  // 16 query rows against keys 0..i0+15, then their P V
          clock.product([&] { amx_rows(i0 / 16 + 1, 0, D / 2, Q32 + (int64_t)i0 * lq, lq, Kt.data(), T, S.data(), T); });
          for (int r = 0; r < 16; r += RB) softmax_rows(i0 + r, S.data() + (int64_t)r * T);
          // P rows i0..i0+15, just written (in L1), are zero past key i0+15
          clock.product([&] {
            amx_rows(D / 16, 0, whole_tiles((i0 + 16) / 2, T / 2), P32 + (int64_t)i0 * (T / 2), T / 2, Vp.data(), D,
                     Of.data(), D);
          });
          store_rows(i0, 16);
        }
        continue;
      }
      for (int i0 = 0; i0 < T; i0 += RB) {
        const int ncols = ((i0 + RB + 15) / 16) * 16;  // keys 0..i0+RB-1, in whole vectors
        clock.product([&] { row_block<RB>(ncols / 16, 0, D / 2, Q32 + (int64_t)i0 * lq, lq, Kt.data(), T, S.data(), T); });
        softmax_rows(i0, S.data());
      }
      for (int i0 = 0; i0 < T; i0 += RO) {
        const int pend = (i0 + RO) / 2;  // P rows i0..i0+RO-1 are zero past key i0+RO-1
        clock.product([&] {
          if (D / 16 == 2) kernel<RO, 2>(0, pend, P32 + (int64_t)i0 * (T / 2), T / 2, Vp.data(), D, Of.data(), D);
          else
            for (int c = 0; c < D / 16; ++c)
              kernel<RO, 1>(0, pend, P32 + (int64_t)i0 * (T / 2), T / 2, Vp.data() + 16 * c, D, Of.data() + 16 * c, D);
        });
        store_rows(i0, RO);
      }
    }
  });
}

// The backward of N slices: dO, q, k, v (q and k as the products read them: rotated, with rope) and
// the saved P in; dQ, dK, dV out (with rope dQ and dK rotated back: the gradient of the rotation,
// rope_qkv.cpp's rope_split_qkv_bwd, of the same bf16 values).
void attention_backward(int64_t N, int T, int D, const Rows& dO, const Rows& q, const Rows& k, const Rows& v,
                        const Rope& rope, const uint32_t* pd, const Rows& dq, const Rows& dk, const Rows& dv) {
  const float scale = 1.0f / std::sqrt((float)D);
  const bool amx = amx_on();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    SectionClock clock(2);
    std::vector<uint32_t> Vt((size_t)T * D / 2), Kp((size_t)T * D / 2);
    std::vector<uint32_t> dSp((size_t)T * T / 2);
    std::unique_ptr<bf16[]> G(rope ? new bf16[(size_t)T * D] : nullptr);  // dQ or dK before the rotation back
    const __m512i kPairIdx = pair_interleave_index();
    const __m512i hi_half = _mm512_set1_epi32((int)0xFFFF0000u);
    std::vector<bf16> dS((size_t)T * T);
    std::vector<uint32_t> QT((size_t)T * D / 2), dOT((size_t)T * D / 2), tmp((size_t)T * D / 2);
    std::vector<float> dP((size_t)16 * T), Cf((size_t)D * T);
    const __m512 sc = _mm512_set1_ps(scale);
    std::unique_ptr<AmxScope> tiles(amx ? new AmxScope : nullptr);
    for (int64_t n = begin; n < end; ++n) {
      const bf16* dOn = dO.at(n, D);
      const bf16* Q = q.at(n, D);
      const bf16* K = k.at(n, D);
      const int64_t ldq = q.ld, ldk = k.ld;
      const uint32_t* Pn = pd + n * T * T / 2;  // the forward's P by pairs of rows: Pn[i/2][j] = (P[i][j], P[i+1][j])
      // dS of rows i0..i0+RB-1 from their dP (keys up to i0+RB-1) in dPb (RB rows of T floats):
      // dS row-major (for dQ) and as pairs of rows (for dK^T, as P's pairs are for dV^T), whose
      // column blocks of 64 read row i up to the end of its own block of 64 (zeros past the
      // diagonal): dSp[i/2][j] = (dS[i][j], dS[i+1][j])
      auto ds_rows = [&](int i0, const float* dPb) {
        const int pcols = std::min(T, ((i0 + RB + 63) / 64) * 64);
        for (int r = 0; r < RB; r += 2) {
          const int i = i0 + r;  // rows i, i+1 (i even): keys 0..i+1 lie in the same nv vectors
          const int nv = i / 16 + 1;
          const uint32_t* pp = Pn + (int64_t)(i / 2) * T;
          const float* da = dPb + (int64_t)r * T;
          const float* db = da + T;
          __m512 acc_a = _mm512_setzero_ps(), acc_b = _mm512_setzero_ps();
          for (int c = 0; c < nv; ++c) {  // P is exactly 0 past each row's key, so whole vectors are safe
            const __m512i w = _mm512_loadu_si512(pp + 16 * c);
            acc_a = _mm512_fmadd_ps(_mm512_loadu_ps(da + 16 * c), _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc_a);
            acc_b = _mm512_fmadd_ps(_mm512_loadu_ps(db + 16 * c), _mm512_castsi512_ps(_mm512_and_si512(w, hi_half)), acc_b);
          }
          const __m512 rs_a = _mm512_set1_ps(_mm512_reduce_add_ps(acc_a));
          const __m512 rs_b = _mm512_set1_ps(_mm512_reduce_add_ps(acc_b));
          bf16* sa = dS.data() + (int64_t)i * T;
          bf16* sb = sa + T;
          uint32_t* dso = dSp.data() + (int64_t)(i / 2) * T;
          for (int c = 0; c < nv; ++c) {
            const __m512i w = _mm512_loadu_si512(pp + 16 * c);
            const __m512 fa = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            const __m512 fb = _mm512_castsi512_ps(_mm512_and_si512(w, hi_half));
            const __m512 ga = _mm512_mul_ps(_mm512_mul_ps(fa, _mm512_sub_ps(_mm512_loadu_ps(da + 16 * c), rs_a)), sc);
            const __m512 gb = _mm512_mul_ps(_mm512_mul_ps(fb, _mm512_sub_ps(_mm512_loadu_ps(db + 16 * c), rs_b)), sc);
            store_row_pair(ga, gb, kPairIdx, sa + 16 * c, sb + 16 * c, dso + 16 * c);
          }
          zero_pair_tail(sa, sb, dso, nv, T, pcols);  // dQ reads dS up to 32 keys, dK^T the pairs up to pcols
        }
      };
      // dQ's rows i0.. from Cf: to dQ, or with rope to G (rotated back below)
      bf16* dQo = rope ? G.get() : dq.at(n, D);
      const int64_t ldo = rope ? D : dq.ld;
      auto store_dq = [&](int i0, int rows) {
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < D / 16; ++c) store_bf16x16(dQo + (i0 + r) * ldo + 16 * c, _mm512_loadu_ps(Cf.data() + r * D + 16 * c));
      };
      // G's rows rotated back into out's (the rotation's transpose: rope_qkv.cpp's backward)
      auto rotate_back = [&](const Rows& out) {
        bf16* dst = out.at(n, D);
        for (int t = 0; t < T; ++t)
          rope_row<true>(G.get() + (int64_t)t * D, rope.cos + (int64_t)t * D, rope.sin + (int64_t)t * D, D, dst + t * out.ld);
      };
      // dK^T (which 0) or dV^T (1), (D x T) in C, stored as dK or dV
      auto store_dkv = [&](int which, const float* C) {
        if (which == 0 && rope) {
          store_transposed(C, D, T, G.get(), D);
          rotate_back(dk);
        } else {
          const Rows& out = which == 0 ? dk : dv;
          store_transposed(C, D, T, out.at(n, D), out.ld);
        }
      };
      pack_transposed(v.at(n, D), T, D, v.ld, Vt.data());         // Vt[p][j] = v[j][2p..2p+1]
      pack_row_pairs(K, T, D, (int)ldk, Kp.data(), D);            // Kp[j/2][d]
      pack_row_pairs(Q, T, D, (int)ldq, tmp.data(), D);           // (T/2, D) pairs of query rows
      transpose32(tmp.data(), T / 2, D, D, QT.data());            // QT[d][i/2] = (q[i][d], q[i+1][d])
      pack_row_pairs(dOn, T, D, (int)dO.ld, tmp.data(), D);
      transpose32(tmp.data(), T / 2, D, D, dOT.data());
      const uint32_t* dO32 = reinterpret_cast<const uint32_t*>(dOn);
      const int lo = (int)(dO.ld / 2);
      const uint32_t* dS32 = reinterpret_cast<const uint32_t*>(dS.data());
      if (amx) {
        for (int i0 = 0; i0 < T; i0 += 16) {  // dP = dO V^T, 16 rows against keys 0..i0+15; then dS
          clock.product([&] { amx_rows(i0 / 16 + 1, 0, D / 2, dO32 + (int64_t)i0 * lo, lo, Vt.data(), T, dP.data(), T); });
          for (int r = 0; r < 16; r += RB) ds_rows(i0 + r, dP.data() + (int64_t)r * T);
        }
        for (int i0 = 0; i0 < T; i0 += 16) {  // dQ = dS K: dS rows i0..i0+15 are zero past key i0+15
          clock.product([&] {
            amx_rows(D / 16, 0, whole_tiles((i0 + 16) / 2, T / 2), dS32 + (int64_t)i0 * (T / 2), T / 2, Kp.data(), D,
                     Cf.data(), D);
          });
          store_dq(i0, 16);
        }
        if (rope) rotate_back(dq);
        // dK^T = Q^T dS and dV^T = dO^T P, (D, T): columns j0..j0+63 need queries i >= j0, and pairs of
        // rows from j0 on are zero (or written zeros) past each row's diagonal up to j0+63 (ds_rows)
        for (int which = 0; which < 2; ++which) {
          const uint32_t* A = which == 0 ? QT.data() : dOT.data();
          const uint32_t* B = which == 0 ? dSp.data() : Pn;
          float* C = Cf.data();
          clock.product([&] {
            for (int d0 = 0; d0 < D; d0 += 16)
              for (int j0 = 0; j0 < T; j0 += 64)
                amx_rows(std::min(4, (T - j0) / 16), j0 / 2, T / 2, A + (int64_t)d0 * (T / 2), T / 2, B + j0, T,
                         C + (int64_t)d0 * T + j0, T);
          });
          store_dkv(which, C);
        }
        continue;
      }
      for (int i0 = 0; i0 < T; i0 += RB) {
        const int ncols = ((i0 + RB + 15) / 16) * 16;
        clock.product([&] { row_block<RB>(ncols / 16, 0, D / 2, dO32 + (int64_t)i0 * lo, lo, Vt.data(), T, dP.data(), T); });
        ds_rows(i0, dP.data());
      }
      // dQ = dS K: rows i0..i0+RO-1 need keys up to i0+RO-1
      for (int i0 = 0; i0 < T; i0 += RO) {
        const int pend = (i0 + RO) / 2;
        float* C = Cf.data();
        clock.product([&] {
          if (D / 16 == 2) kernel<RO, 2>(0, pend, dS32 + (int64_t)i0 * (T / 2), T / 2, Kp.data(), D, C, D);
          else
            for (int c = 0; c < D / 16; ++c)
              kernel<RO, 1>(0, pend, dS32 + (int64_t)i0 * (T / 2), T / 2, Kp.data() + 16 * c, D, C + 16 * c, D);
        });
        store_dq(i0, RO);
      }
      if (rope) rotate_back(dq);
      // dK^T = Q^T dS and dV^T = dO^T P: (D, T), columns j0.. need queries i >= j0
      for (int which = 0; which < 2; ++which) {
        const uint32_t* A = which == 0 ? QT.data() : dOT.data();
        const uint32_t* B = which == 0 ? dSp.data() : Pn;
        float* C = Cf.data();  // (D, T)
        clock.product([&] {
          for (int d0 = 0; d0 < D; d0 += RB) {
            int j0 = 0;
            for (; j0 + 64 <= T; j0 += 64)
              kernel<RB, 4>(j0 / 2, T / 2, A + (int64_t)d0 * (T / 2), T / 2, B + j0, T, C + (int64_t)d0 * T + j0, T);
            for (; j0 < T; j0 += 16)
              kernel<RB, 1>(j0 / 2, T / 2, A + (int64_t)d0 * (T / 2), T / 2, B + j0, T, C + (int64_t)d0 * T + j0, T);
          }
        });
        store_dkv(which, C);
      }
    }
  });
}

// qkv's and the tables' checks, one clear line each; returns the tables as the kernels take them
Rope checked_rope(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kBFloat16 && qkv.dim() == 5 && qkv.size(2) == 3 &&
                  qkv.is_contiguous() && qkv.size(1) % 32 == 0 && qkv.size(4) % 32 == 0,
              "fused causal attention: qkv must be a contiguous (B, T, 3, H, d_head) bf16 CPU tensor, T and d_head "
              "multiples of 32");
  const int64_t T = qkv.size(1), D = qkv.size(4);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) >= T && t->size(1) == D,
                "fused causal attention: cos and sin must be contiguous bf16 CPU tables of at least (T, d_head)");
  return {reinterpret_cast<const bf16*>(cos.data_ptr()), reinterpret_cast<const bf16*>(sin.data_ptr())};
}

void check_pattern(const at::Tensor& P, int64_t N, int64_t T) {
  TORCH_CHECK(P.is_contiguous() && P.scalar_type() == at::kBFloat16 && P.dim() == 3 && P.size(0) == N && P.size(1) == T &&
                  P.size(2) == T,
              "fused causal attention: P must be the forward's (N, T, T) bf16 pattern");
}

// q, k or v (which 0, 1, 2) of slice n = b H + h inside a (B, T, 3, H, D) projection
Rows qkv_rows(const at::Tensor& qkv, int which) {
  const int64_t T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  return {reinterpret_cast<bf16*>(qkv.data_ptr()) + which * H * D, H, T * 3 * H * D, 3 * H * D};
}

Rows bthd_rows(const at::Tensor& t) {  // a (B, T, H, D) tensor
  return {reinterpret_cast<bf16*>(t.data_ptr()), t.size(2), t.size(1) * t.size(2) * t.size(3), t.size(2) * t.size(3)};
}

}  // namespace

// q, k, v: (N, T, D) bf16. Returns (O, P): (N, T, D) bf16, and P as the backward reads it: an (N, T, T)
// bf16 buffer holding each slice's rows by pairs, P[n][i/2][j][i%2] (P[i][j] and P[i+1][j] in one
// 32-bit word); past each pair's diagonal vector zero up to the end of its block of 64 keys and
// unset beyond (nothing reads them). fused_attention.pattern unpacks it.
std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v) {
  check_inputs(q, "q"); check_inputs(k, "k"); check_inputs(v, "v");
  const int64_t N = q.size(0);
  const int T = (int)q.size(1), D = (int)q.size(2);
  TORCH_CHECK(T % 32 == 0 && D % 32 == 0 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "fused causal attention: T and d_head must be multiples of 32 and q, k, v of one shape");
  auto O = at::empty({N, T, D}, q.options());
  auto P = at::empty({N, (int64_t)T, (int64_t)T}, q.options());
  attention_forward(N, T, D, contiguous(q), contiguous(k), contiguous(v), Rope{}, contiguous(O),
                    reinterpret_cast<uint32_t*>(P.data_ptr()));
  return {O, P};
}

// dO, q, k, v: (N, T, D) bf16; P: (N, T, T) bf16 from the forward. Returns (dQ, dK, dV).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& dO, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& P) {
  check_inputs(dO, "dO"); check_inputs(q, "q"); check_inputs(k, "k"); check_inputs(v, "v");
  const int64_t N = q.size(0);
  const int T = (int)q.size(1), D = (int)q.size(2);
  check_pattern(P, N, T);
  auto dQ = at::empty({N, T, D}, q.options()), dK = at::empty({N, T, D}, q.options()), dV = at::empty({N, T, D}, q.options());
  attention_backward(N, T, D, contiguous(dO), contiguous(q), contiguous(k), contiguous(v), Rope{},
                     reinterpret_cast<const uint32_t*>(P.data_ptr()), contiguous(dQ), contiguous(dK), contiguous(dV));
  return {dQ, dK, dV};
}

// qkv: the projection's (B, T, 3, H, D) bf16 output with the query and key columns in RoPE's
// half-split order; cos, sin: (>= T, D) bf16 tables in that order (rope_qkv.cpp). The attention of
// rope_split_qkv's (q, k, v), bit for bit, without the separate passes: each slice's queries and keys
// are rotated as the kernel packs them (into QK, which the backward reads), values read in place.
// Returns (O, P, QK): O as (B, T, H, D), the layout W_O's product reads (no transposing copy), P as
// causal_attention_fwd's, QK the rotated queries and keys (2, B H, T, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_qkv_fwd(const at::Tensor& qkv, const at::Tensor& cos,
                                                                 const at::Tensor& sin) {
  const Rope rope = checked_rope(qkv, cos, sin);
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  auto O = at::empty({B, T, H, D}, qkv.options());
  auto P = at::empty({B * H, T, T}, qkv.options());
  auto QK = at::empty({2, B * H, T, D}, qkv.options());
  bf16* qk = reinterpret_cast<bf16*>(QK.data_ptr());
  attention_forward(B * H, (int)T, (int)D, qkv_rows(qkv, 0), qkv_rows(qkv, 1), qkv_rows(qkv, 2), rope, bthd_rows(O),
                    reinterpret_cast<uint32_t*>(P.data_ptr()), qk, qk + B * H * T * D);
  return {O, P, QK};
}

// dO: (B, T, H, D) bf16; qkv, cos, sin, P, QK as attention_qkv_fwd took and returned them. Returns
// dqkv (B, T, 3, H, D): causal_attention_bwd's dQ, dK, dV through rope_split_qkv_bwd, bit for bit.
at::Tensor attention_qkv_bwd(const at::Tensor& dO, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& P, const at::Tensor& QK) {
  const Rope rope = checked_rope(qkv, cos, sin);
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(dO.device().is_cpu() && dO.scalar_type() == at::kBFloat16 && dO.is_contiguous() && dO.dim() == 4 &&
                  dO.size(0) == B && dO.size(1) == T && dO.size(2) == H && dO.size(3) == D,
              "fused causal attention: dO must be a contiguous (B, T, H, d_head) bf16 CPU tensor");
  check_pattern(P, B * H, T);
  TORCH_CHECK(QK.is_contiguous() && QK.scalar_type() == at::kBFloat16 && QK.dim() == 4 && QK.size(0) == 2 &&
                  QK.size(1) == B * H && QK.size(2) == T && QK.size(3) == D,
              "fused causal attention: QK must be the forward's (2, B H, T, d_head) rotated queries and keys");
  auto dqkv = at::empty_like(qkv);
  bf16* qk = reinterpret_cast<bf16*>(QK.data_ptr());
  const Rows qr{qk, 1, T * D, D}, kr{qk + B * H * T * D, 1, T * D, D};
  attention_backward(B * H, (int)T, (int)D, bthd_rows(dO), qr, kr, qkv_rows(qkv, 2), rope,
                     reinterpret_cast<const uint32_t*>(P.data_ptr()), qkv_rows(dqkv, 0), qkv_rows(dqkv, 1),
                     qkv_rows(dqkv, 2));
  return dqkv;
}

// mode < 0: ask; 0: the dot-product loop; 1: AMX where the CPU and the OS allow it. Returns whether
// AMX is used from now on.
bool amx(int64_t mode) {
  if (mode >= 0) g_amx.store(mode == 1 && amx_supported() ? 1 : 0, std::memory_order_relaxed);
  return amx_on();
}

// mode 1: start timing (counters zeroed), 0: stop, < 0: leave as is. Returns the ticks summed so far:
// {forward products, forward threads' total, backward products, backward threads' total}. Mode 2: the
// time stamp counter now, {ticks} (to convert ticks to seconds: fused_attention.tsc_hz).
std::vector<int64_t> attention_cycles(int64_t mode) {
  if (mode == 2) return {(int64_t)__rdtsc()};
  if (mode == 1)
    for (auto& t : g_ticks) t.store(0, std::memory_order_relaxed);
  if (mode >= 0) g_timing.store(mode == 1, std::memory_order_relaxed);
  std::vector<int64_t> out;
  for (auto& t : g_ticks) out.push_back(t.load(std::memory_order_relaxed));
  return out;
}

TORCH_LIBRARY(icl_fused, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor dO, Tensor q, Tensor k, Tensor v, Tensor P) -> (Tensor, Tensor, Tensor)");
  m.def("attention_qkv_fwd(Tensor qkv, Tensor cos, Tensor sin) -> (Tensor, Tensor, Tensor)");
  m.def("attention_qkv_bwd(Tensor dO, Tensor qkv, Tensor cos, Tensor sin, Tensor P, Tensor QK) -> Tensor");
  m.def("amx(int mode) -> bool", &amx);
  m.def("attention_cycles(int mode) -> int[]", &attention_cycles);
}

TORCH_LIBRARY_IMPL(icl_fused, CPU, m) {
  m.impl("causal_attention_fwd", &causal_attention_fwd);
  m.impl("causal_attention_bwd", &causal_attention_bwd);
  m.impl("attention_qkv_fwd", &attention_qkv_fwd);
  m.impl("attention_qkv_bwd", &attention_qkv_bwd);
}
