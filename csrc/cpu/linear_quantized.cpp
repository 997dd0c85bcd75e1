// out = input @ W^T for weights quantized in blocks of 32 along K (lisa_rt/quant.py):
//   q8_0: data int8 [N, K], w = d q;
//   q4_1: data uint8 [N, K / 2], w = d q + m, q in 0..15; a block's 16 bytes hold its first 16
//         weights in their low nibbles and its last 16 in their high ones (llama.cpp's order);
// d (and m) float16 [N, K / 32]. The input rows are quantized too, to 8 bits in blocks of 32
// (x = e p, e = the block's largest |x| / 127, p rounded to nearest even), as llama.cpp does,
// so that a block's products are integer ones: the result is, up to float32 summation order,
// the float product of the two dequantized matrices, on every path.
//
// Decode streams the weights, so a quarter (q4_1: about a third) of bfloat16's bytes is the
// point, and only integer dot products keep up with that: 32 byte pairs an instruction
// (vpmaddubsw), their sums widened (vpmaddwd), one float conversion and one FMA a block. Up to
// kMaxStreamedRows input rows, three at a time share each pass over a weight row; tiles of
// weight rows small enough for L2 serve the later passes of more rows. Above that, and on CPUs
// without AVX2, blocks of weight rows are dequantized to float32 for at::mm, with the input rows
// as their 8-bit blocks stand for them.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "vec_avx2.h"

namespace lisa_rt {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxStreamedRows = 64;
constexpr int64_t kTileBytes = 128 * 1024;

inline float half_to_float(c10::Half h) { return static_cast<float>(h); }
// The same by F16C, one instruction (c10's conversion is a routine of a dozen).
LISA_AVX2 inline float half_to_float_f16c(c10::Half h) { return _cvtsh_ss(h.x); }

// Input rows [m, k] as 8-bit blocks: p int8 [m, k], e [m, k / 32], and e times the block's sum
// of p (what q4_1's m multiplies).
struct QuantizedInput {
  std::vector<int8_t> p;
  std::vector<float> e, e_sum;
  int64_t k;
  QuantizedInput(const float* x, int64_t m, int64_t k) : p(m * k), e(m * (k / kBlock)), e_sum(m * (k / kBlock)), k(k) {
    at::parallel_for(0, m * (k / kBlock), 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {  // b: a block of some row (rows are whole blocks)
        const float* v = x + b * kBlock;
        float largest = 0.0f;
        bool finite = true;
        for (int j = 0; j < kBlock; ++j) {
          finite = finite && std::isfinite(v[j]);
          largest = std::max(largest, std::fabs(v[j]));
        }
        if (!finite) {  // NaN or inf: the block's products are NaN, as float ones would be
          std::fill(p.begin() + b * kBlock, p.begin() + (b + 1) * kBlock, 0);
          e[b] = e_sum[b] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        // A block too small for 127 / largest (below about 4e-37) counts as zeros.
        float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        if (!std::isfinite(inverse)) inverse = 0.0f;
        const float scale = largest / 127.0f;
        int sum = 0;
        for (int j = 0; j < kBlock; ++j) {
          const int q = static_cast<int>(std::nearbyint(v[j] * inverse));
          p[b * kBlock + j] = static_cast<int8_t>(q);
          sum += q;
        }
        e[b] = scale;
        e_sum[b] = scale * static_cast<float>(sum);
      }
    });
  }
  // The float rows these blocks stand for.
  at::Tensor dequantized(int64_t m) const {
    at::Tensor out = at::empty({m, k}, at::kFloat);
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < m * k; ++i) o[i] = e[i / kBlock] * static_cast<float>(p[i]);
    return out;
  }
};

struct Q8Weights {
  const int8_t* data;
  const c10::Half* scales;
  int64_t k;
  int64_t row_bytes() const { return k; }
  // Weights [r, 32 b + 8 u, ... + 8) as float32.
  LISA_AVX2 void block(int64_t r, int64_t b, __m256 w[4]) const {
    const int8_t* q = data + r * k + b * kBlock;
    const __m256 d = _mm256_set1_ps(half_to_float_f16c(scales[r * (k / kBlock) + b]));
    for (int u = 0; u < 4; ++u) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * u));
      w[u] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d);
    }
  }
  float at(int64_t r, int64_t c) const {
    return half_to_float(scales[r * (k / kBlock) + c / kBlock]) * static_cast<float>(data[r * k + c]);
  }
  // M input rows' dot products with weight row r (their 8-bit blocks in x).
  template <int M>
  LISA_AVX2 void row_dots(const QuantizedInput& x, const int64_t* rows, int64_t r, float* out) const {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t blocks = k / kBlock;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    const int8_t* q = data + r * k;
    const c10::Half* d = scales + r * blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
      const __m256i magnitude = _mm256_sign_epi8(w, w);  // |w| as unsigned bytes (w is never -128)
      const float dw = half_to_float_f16c(d[b]);
      for (int i = 0; i < M; ++i) {
        const int64_t at = rows[i] * k + b * kBlock;
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.p.data() + at));
        // |w| times p with w's sign: the pairs' sums fit in 16 bits (2 x 127 x 127).
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(p, w));
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[i] = _mm256_fmadd_ps(sums, _mm256_set1_ps(dw * x.e[at / kBlock]), acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i] = hsum(acc[i]);
  }
};

struct Q41Weights {
  const uint8_t* data;
  const c10::Half* scales;
  const c10::Half* mins;
  int64_t k;
  int64_t row_bytes() const { return k / 2; }
  LISA_AVX2 void block(int64_t r, int64_t b, __m256 w[4]) const {
    const uint8_t* q = data + r * (k / 2) + b * (kBlock / 2);
    const int64_t s = r * (k / kBlock) + b;
    const __m256 d = _mm256_set1_ps(half_to_float_f16c(scales[s])), m = _mm256_set1_ps(half_to_float_f16c(mins[s]));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int u = 0; u < 4; ++u) w[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[u])), d, m);
  }
  float at(int64_t r, int64_t c) const {
    const int64_t s = r * (k / kBlock) + c / kBlock, j = c % kBlock;
    const uint8_t byte = data[r * (k / 2) + (c / kBlock) * (kBlock / 2) + j % 16];
    const int q = j < 16 ? (byte & 0x0F) : (byte >> 4);
    return half_to_float(scales[s]) * static_cast<float>(q) + half_to_float(mins[s]);
  }
  // sum over a block of (d q + m) e p = d e (q . p) + m (e sum p).
  template <int M>
  LISA_AVX2 void row_dots(const QuantizedInput& x, const int64_t* rows, int64_t r, float* out) const {
    const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0F);
    const int64_t blocks = k / kBlock;
    __m256 acc[M];
    float offset[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps(), offset[i] = 0.0f;
    const uint8_t* q = data + r * (k / 2);
    const c10::Half *d = scales + r * blocks, *mn = mins + r * blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * (kBlock / 2)));
      // Low nibbles (the block's first 16) in the low half, high nibbles in the high half.
      const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), nibble);
      const float dw = half_to_float_f16c(d[b]), mw = half_to_float_f16c(mn[b]);
      for (int i = 0; i < M; ++i) {
        const int64_t at = rows[i] * k + b * kBlock;
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.p.data() + at));
        const __m256i pairs = _mm256_maddubs_epi16(w, p);  // (0..15) x (-127..127): no saturation
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[i] = _mm256_fmadd_ps(sums, _mm256_set1_ps(dw * x.e[at / kBlock]), acc[i]);
        offset[i] += mw * x.e_sum[at / kBlock];
      }
    }
    for (int i = 0; i < M; ++i) out[i] = hsum(acc[i]) + offset[i];
  }
};

// Rows [begin, end) of y [m, n] for m quantized inputs, in L2-sized tiles of weight rows, three
// inputs per pass over a tile.
template <typename W>
LISA_AVX2 void streamed_rows(const QuantizedInput& x, int64_t m, const W& w, float* y, int64_t begin, int64_t end,
                             int64_t n) {
  const int64_t tile = std::max<int64_t>(8, kTileBytes / w.row_bytes());
  float dots[3];
  for (int64_t t = begin; t < end; t += tile) {
    const int64_t t_end = std::min(end, t + tile);
    for (int64_t i = 0; i < m; i += 3) {
      const int64_t rows[3] = {i, std::min(i + 1, m - 1), std::min(i + 2, m - 1)};
      const int64_t count = std::min<int64_t>(3, m - i);
      for (int64_t r = t; r < t_end; ++r) {
        if (count == 1) w.template row_dots<1>(x, rows, r, dots);
        else if (count == 2) w.template row_dots<2>(x, rows, r, dots);
        else w.template row_dots<3>(x, rows, r, dots);
        for (int64_t j = 0; j < count; ++j) y[(i + j) * n + r] = dots[j];
      }
    }
  }
}

template <typename W>
LISA_AVX2 void dequantize_row_avx2(const W& w, int64_t r, float* out) {
  for (int64_t b = 0; b < w.k / kBlock; ++b) {
    __m256 wv[4];
    w.block(r, b, wv);
    for (int u = 0; u < 4; ++u) _mm256_storeu_ps(out + b * kBlock + 8 * u, wv[u]);
  }
}

// Weight rows [r0, r0 + rows) as float32 [rows, K].
template <typename W>
at::Tensor dequantized(const W& w, int64_t r0, int64_t rows) {
  at::Tensor out = at::empty({rows, w.k}, at::kFloat);
  float* p = out.data_ptr<float>();
  const bool simd = has_avx2();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (simd) {
        dequantize_row_avx2(w, r0 + r, p + r * w.k);
      } else {
        for (int64_t c = 0; c < w.k; ++c) p[r * w.k + c] = w.at(r0 + r, c);
      }
    }
  });
  return out;
}

template <typename W>
void quantized_product(at::Tensor& out, const at::Tensor& input, const W& w, int64_t n) {
  const int64_t m = input.size(0);
  const at::Tensor x = input.to(at::kFloat).contiguous();
  const QuantizedInput blocks(x.data_ptr<float>(), m, w.k);
  if (m <= kMaxStreamedRows && has_avx2()) {
    at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty({m, n}, at::kFloat);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) { streamed_rows(blocks, m, w, yp, begin, end, n); });
    if (!y.is_same(out)) out.copy_(y);
    return;
  }
  mm_by_weight_blocks(out, blocks.dequantized(m), n, w.k,
                      [&](int64_t r, int64_t rows) { return dequantized(w, r, rows); });
}

void linear_quantized_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& data,
                          const at::Tensor& scales, const c10::optional<at::Tensor>& mins) {
  TORCH_CHECK(input.dim() == 2 && out.dim() == 2 && data.dim() == 2 && scales.dim() == 2,
              "linear_quantized: input, out, data and scales must be 2-D");
  TORCH_CHECK(input.is_floating_point() && out.scalar_type() == input.scalar_type(),
              "linear_quantized: input and out must be floating point, of one dtype");
  TORCH_CHECK(out.is_contiguous() && data.is_contiguous() && scales.is_contiguous(),
              "linear_quantized: out, data and scales must be contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "linear_quantized: scales must be float16");
  const bool q4 = data.scalar_type() == at::kByte;
  TORCH_CHECK(q4 || data.scalar_type() == at::kChar, "linear_quantized: data must be int8 (q8_0) or uint8 (q4_1)");
  TORCH_CHECK(q4 == mins.has_value(), "linear_quantized: q4_1 (uint8 data) takes mins, q8_0 (int8) none");
  const int64_t m = input.size(0), k = input.size(1), n = data.size(0);
  TORCH_CHECK(k > 0 && k % kBlock == 0, "linear_quantized: K must be a positive multiple of 32, got ", k);
  TORCH_CHECK(data.size(1) == (q4 ? k / 2 : k), "linear_quantized: data has ", data.size(1), " columns for K = ", k);
  TORCH_CHECK(scales.size(0) == n && scales.size(1) == k / kBlock, "linear_quantized: scales must be [N, K / 32]");
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "linear_quantized: out must be [rows, N]");
  if (q4) {
    const at::Tensor& mn = *mins;
    TORCH_CHECK(mn.scalar_type() == at::kHalf && mn.is_contiguous() && mn.sizes() == scales.sizes(),
                "linear_quantized: mins must be float16, contiguous, shaped as scales");
  }
  if (m == 0 || n == 0) return;
  if (q4)
    return quantized_product(out, input, Q41Weights{data.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(),
                                                    mins->data_ptr<c10::Half>(), k}, n);
  quantized_product(out, input, Q8Weights{data.data_ptr<int8_t>(), scales.data_ptr<c10::Half>(), k}, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("linear_quantized", &linear_quantized_cpu); }

}  // namespace lisa_rt
