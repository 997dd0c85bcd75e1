// out = input @ weight^T for the few-row products of decode (weights [N, K], row-major).
//
// Decode multiplies a handful of rows (one per sequence in the batch) by every weight matrix, so
// it is bound by how fast the weights stream from memory. The threads stream disjoint ranges of
// weight rows, each range row after row (one sequential stream, which the hardware prefetchers
// keep ahead of), in tiles small enough to stay in L2 so that inputs past the third re-read a
// tile from L2, not memory. float32 runs AVX2/FMA (a portable loop serves other CPUs); bfloat16
// runs AVX512-BF16 dot products (vdpbf16ps: 32 pairs an instruction, float32 sums) where the CPU
// has them, else (and for float16) AVX2/FMA on weights widened as they load (half float32's
// bytes to stream), up to 64 rows. Above 8 rows at::mm is faster in real decode for float32 and
// AVX512-BF16. Larger float16 products, and bfloat16 ones on CPUs without AVX512-BF16, go
// through float32 (torch emulates them there, 4-6x slower).
#include "common.h"
#include "vec_avx2.h"

namespace lisa_rt {
namespace {

constexpr int64_t kMaxGemvRows = 8;         // input rows handled by the streaming kernels
// ... and by the one that widens 16-bit weights as they load, up to 64 rows: on a Zen 3 it beat
// converting the weights to float32 for at::mm at every count up to 64 (a decode step's GEMMs
// at 22 rows: 74 ms against 220, and float32's at::mm 106; BENCHMARKS.md).
constexpr int64_t kMaxWidenedGemvRows = 64;
constexpr int64_t kTileBytes = 128 * 1024;  // weights per tile: stays in L2 while every row uses it

void gemv_portable(const float* x, int64_t m, const float* w, float* y, int64_t n_begin, int64_t n_end, int64_t k,
                   int64_t n) {
  for (int64_t r = n_begin; r < n_end; ++r) {
    const float* row = w + r * k;
    for (int64_t i = 0; i < m; ++i) y[i * n + r] = dot(x + i * k, row, k);
  }
}

// One weight row against M float32 input rows: y[i * n + r] = x_i . w_r, U sums per input row
// so the FMAs are independent. (Reading four rows side by side instead, as this kernel once did,
// streamed the LM head from memory at less than half the rate here: BENCHMARKS.md.) Weights W
// are float32, or float16 or bfloat16 (without AVX512-BF16) widened as they load (the caller
// widens the inputs once); k a multiple of 8 (the caller checks).
template <int M, typename W>
LISA_AVX2 void gemv_row(const float* x, const W* w, W* y, int64_t r, int64_t k, int64_t n) {
  // U stays 4 whatever M, so a row's sums come out the same alone or in a batch.
  constexpr int U = 4;
  __m256 acc[M][U];
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
  const W* row = w + r * k;
  int64_t c = 0;
  for (; c + 8 * U <= k; c += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load8(row + c + 8 * u);
      for (int i = 0; i < M; ++i) acc[i][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + c + 8 * u), acc[i][u]);
    }
  }
  for (; c < k; c += 8) {
    const __m256 wv = load8(row + c);
    for (int i = 0; i < M; ++i) acc[i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + c), acc[i][0]);
  }
  for (int i = 0; i < M; ++i) {
    for (int u = 1; u < U; ++u) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
    y[i * n + r] = static_cast<W>(hsum(acc[i][0]));
  }
}

// bfloat16: 32 products an instruction (vdpbf16ps) into float32 sums; k a multiple of 32.
template <int M>
LISA_AVX512_BF16 void gemv_row(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t r, int64_t k,
                               int64_t n) {
  constexpr int U = 4;
  __m512 acc[M][U];
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
  const c10::BFloat16* row = w + r * k;
  int64_t c = 0;
  for (; c + 32 * U <= k; c += 32 * U) {
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + c + 32 * u);
      for (int i = 0; i < M; ++i)
        acc[i][u] = _mm512_dpbf16_ps(acc[i][u], (__m512bh)_mm512_loadu_si512(x + i * k + c + 32 * u), wv);
    }
  }
  for (; c < k; c += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + c);
    for (int i = 0; i < M; ++i) acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(x + i * k + c), wv);
  }
  for (int i = 0; i < M; ++i) {
    const __m512 v = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
    // Halves through memory: GCC 12's intrinsics that take them apart in registers (reduce_add,
    // extract, cast) warn of an uninitialised value.
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    y[i * n + r] = c10::BFloat16(hsum(_mm256_add_ps(_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8))));
  }
}

// The next tile's weights asked for into L2 while the passes over the current one compute,
// `per` cache lines after each weight row, so that its first pass does not wait on memory.
struct TilePrefetch {
  const char* at;
  const char* end;
  int64_t per;
  void step() {
    for (int64_t i = 0; i < per && at < end; ++i, at += 64) prefetch_line_l2(at);
  }
};

// Rows [n_begin, n_end) of the product for M inputs.
template <int M, typename X, typename W>
void gemv_span(const X* x, const W* w, W* y, int64_t n_begin, int64_t n_end, int64_t k, int64_t n,
               TilePrefetch& ahead) {
  for (int64_t r = n_begin; r < n_end; ++r) {
    gemv_row<M>(x, w, y, r, k, n);
    ahead.step();
  }
}

// Input rows go three at a time: four at a time spilled the float32 sums (16 of AVX2's 16 ymm
// registers) and, on this project's CPU, decoded a batch of 8 19% (float32) and 8% (bfloat16)
// slower (BENCHMARKS.md).
template <typename X, typename W>
void gemv_rows(const X* x, int64_t m, const W* w, W* y, int64_t n_begin, int64_t n_end, int64_t k, int64_t n,
               TilePrefetch& ahead) {
  for (int64_t i = 0; i < m; i += 3) {
    const X* xi = x + i * k;
    W* yi = y + i * n;
    switch (std::min<int64_t>(3, m - i)) {
      case 1: gemv_span<1>(xi, w, yi, n_begin, n_end, k, n, ahead); break;
      case 2: gemv_span<2>(xi, w, yi, n_begin, n_end, k, n, ahead); break;
      default: gemv_span<3>(xi, w, yi, n_begin, n_end, k, n, ahead); break;
    }
  }
}

// The product over weight rows [n_begin, n_end) in L2-sized tiles: up to three input rows share
// each pass over a tile; more rows re-read the tile from L2, and while they do, the next tile
// streams in (a single pass, up to three rows, is the plain stream the hardware prefetchers keep
// ahead of; asking for more there did not help).
template <typename X, typename W>
void gemv_tiled(const X* x, int64_t m, const W* w, W* y, int64_t n_begin, int64_t n_end, int64_t k, int64_t n) {
  const int64_t tile = std::max<int64_t>(8, kTileBytes / (k * static_cast<int64_t>(sizeof(W))));
  const int64_t passes = (m + 2) / 3, row_bytes = k * static_cast<int64_t>(sizeof(W));
  for (int64_t r = n_begin; r < n_end; r += tile) {
    const int64_t rows = std::min(tile, n_end - r), next_rows = passes > 1 ? std::min(tile, n_end - r - rows) : 0;
    TilePrefetch ahead{nullptr, nullptr, 0};
    if (next_rows > 0) {
      const char* next = reinterpret_cast<const char*>(w + (r + rows) * k);
      const char* first_line = next - reinterpret_cast<uintptr_t>(next) % 64;
      const char* end = next + next_rows * row_bytes;
      const int64_t lines = (end - first_line + 63) / 64;
      ahead = TilePrefetch{first_line, end, (lines + passes * rows - 1) / (passes * rows)};
    }
    gemv_rows(x, m, w, y, r, r + rows, k, n, ahead);
  }
}

// input holds X, weight and out W.
template <typename X, typename W>
void linear_streamed(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, bool simd) {
  const int64_t m = input.size(0), k = input.size(1), n = weight.size(0);
  const X* x = input.data_ptr<X>();
  const W* w = weight.data_ptr<W>();
  W* y = out.data_ptr<W>();
  // Blocks of rows big enough that each thread streams long contiguous stretches of weights.
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<W, float>) {
      if (!simd) return gemv_portable(x, m, w, y, begin, end, k, n);
    }
    gemv_tiled(x, m, w, y, begin, end, k, n);
  });
}

// out = input @ weight^T (bfloat16 or float16) computed in float32, a block of weight rows
// (about 8 MB as float32) at a time: neither the weight nor the product is ever whole in float32.
void mm_via_float(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  mm_by_weight_blocks(out, input.to(at::kFloat), weight.size(0), weight.size(1),
                      [&](int64_t r, int64_t rows) { return weight.narrow(0, r, rows).to(at::kFloat); });
}

void linear_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  check_linear_args(out, input, weight);
  const int64_t m = input.size(0), k = input.size(1);
  if (k == 0) {  // empty sums (and no tile size to divide by)
    out.zero_();
    return;
  }
  const at::ScalarType dtype = input.scalar_type();
  if (m <= kMaxGemvRows && dtype == at::kFloat)
    return linear_streamed<float, float>(out, input, weight, has_avx2() && k % 8 == 0);
  if (m <= kMaxGemvRows && dtype == at::kBFloat16 && has_avx512_bf16() && k % 32 == 0)
    return linear_streamed<c10::BFloat16, c10::BFloat16>(out, input, weight, true);
  // 16-bit weights without dot products of their own: widened as they stream, or through float32.
  if (dtype == at::kHalf || (dtype == at::kBFloat16 && !has_avx512_bf16())) {
    if (m > kMaxWidenedGemvRows || !has_avx2() || k % 8 != 0) return mm_via_float(out, input, weight);
    const at::Tensor x = input.to(at::kFloat);  // the few input rows, widened once
    if (dtype == at::kHalf) return linear_streamed<float, c10::Half>(out, x, weight, true);
    return linear_streamed<float, c10::BFloat16>(out, x, weight, true);
  }
  at::mm_out(out, input, weight.t());
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace lisa_rt
