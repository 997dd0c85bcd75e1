// The pieces every CPU attention kernel is made of, over one sequence's paged cache:
// logits q . K, softmax, and P V. They walk the block table a block at a time, and run AVX2
// code for float32, bfloat16 and float16 caches whose head sizes are multiples of 8 (widening
// each element to float32 as it is loaded; a portable loop serves other CPUs and sizes).
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common.h"
#include "vec_avx2.h"

namespace lisa_rt {

// One sequence's view of a paged pool [blocks, block_size, kv_heads, width].
struct PagedSeq {
  const int32_t* blocks;  // this sequence's row of the block table
  int64_t block_size;
  int64_t num_blocks;
  int64_t kv_heads;

  // Row of key j in the pool seen as [slots * kv_heads, width] rows: the row of its KV head 0.
  int64_t row(int64_t j) const {
    const int64_t block = blocks[j / block_size];
    TORCH_CHECK(block >= 0 && block < num_blocks, "paged attention: block id ", block, " out of range");
    return (block * block_size + j % block_size) * kv_heads;
  }

  // fn(offset, j, rows) for each run of keys [begin, end) that shares a block (begin a block
  // start): offset is the element offset of KV head kv_head of key j; the run's `rows` slots
  // follow kv_heads * width elements apart.
  template <typename F>
  void for_each_block(int64_t begin, int64_t end, int64_t kv_head, int64_t width, F&& fn) const {
    for (int64_t j = begin; j < end; j += block_size) fn((row(j) + kv_head) * width, j, std::min(block_size, end - j));
  }
};

// Whether the AVX2 paths serve elements of type T with head size d.
template <typename T>
bool use_avx2(int64_t d) {
  return kWidenable<T> && d % 8 == 0 && has_avx2();
}

// The paged pools of a batch: block table rows and the pool geometry.
struct PagedPool {
  const int32_t* block_tables;
  int64_t max_blocks;  // row length of block_tables
  int64_t block_size;
  int64_t num_blocks;
  int64_t kv_heads;

  PagedSeq seq(int64_t b) const { return PagedSeq{block_tables + b * max_blocks, block_size, num_blocks, kv_heads}; }
};

// Fills the logits of keys [j0, j0 + n) of sequence b: head h's at s[h * s_stride + j - j0].
using FillLogits = std::function<void(int64_t b, int64_t j0, int64_t n, float* s, int64_t s_stride)>;

// Where decode_split_avx2's logits come from (q . K * scale unless `fill` is set: LiSA's are
// computed otherwise) and go (out: [batch, heads, stride] float32, for a LiSA layer next).
struct DecodeLogits {
  const FillLogits* fill = nullptr;
  float* out = nullptr;
  int64_t stride = 0;
};

// Lane i of the result: the sum of v[i]'s eight lanes.
LISA_AVX2 inline __m256 hsum8x8(const __m256 (&v)[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a: the four sums of v[0..3] over lanes 0-3, then over lanes 4-7; b likewise for v[4..7].
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// dst[0..n) = src[0..n) as float32; n a multiple of 8.
template <typename T>
LISA_AVX2 inline void widen_avx2(float* dst, const T* src, int64_t n) {
  for (int64_t e = 0; e < n; e += 8) _mm256_storeu_ps(dst + e, load8(src + e));
}

// widen_avx2 that also asks for `next` (n elements, the block to be widened after this one)
// into L2, a line for each line widened: blocks of a paged cache come in block-table order,
// which the hardware prefetchers cannot guess. (A burst of a whole block's prefetches at once
// was no faster; prefetches into L1 took a third of what these take off: BENCHMARKS.md.)
template <typename T>
LISA_AVX2 inline void widen_avx2_ahead(float* dst, const T* src, int64_t n, const T* next) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  int64_t e = 0;
  for (; e + kLine <= n; e += kLine) {
    if (next != nullptr) prefetch_line_l2(next + e);
    for (int64_t i = 0; i < kLine; i += 8) _mm256_storeu_ps(dst + e + i, load8(src + e + i));
  }
  if (next != nullptr && e < n) prefetch_line_l2(next + e);
  for (; e < n; e += 8) _mm256_storeu_ps(dst + e, load8(src + e));
}

// `rows` rows of d elements, src_stride apart, into consecutive float32 rows of dst.
template <typename T>
inline void widen_rows_avx2(float* dst, const T* src, int64_t rows, int64_t src_stride, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) widen_avx2(dst + r * d, src + r * src_stride, d);
}

// s[i * s_stride + r] = scale * q_i . K[r] (+= with accumulate) for the g query heads q_i (g
// rows of d) that share one KV head, over its `rows` key rows (`stride` floats apart from k); d a
// multiple of 8. Eight keys at a time, so that a head's eight sums are reduced together.
LISA_AVX2 inline void group_key_logits_avx2(float* s, int64_t s_stride, const float* q, int64_t g, const float* k,
                                            int64_t rows, int64_t stride, int64_t d, float scale,
                                            bool accumulate = false) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int64_t count = std::min<int64_t>(8, rows - r0);
    const float* key[8];
    for (int64_t r = 0; r < 8; ++r) key[r] = k + (r0 + std::min(r, count - 1)) * stride;  // past the rows: unused
    for (int64_t i = 0; i < g; ++i) {
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t c = 0; c < d; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i * d + c);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[r] + c), acc[r]);
      }
      alignas(32) float sums[8];
      _mm256_store_ps(sums, _mm256_mul_ps(hsum8x8(acc), vscale));
      float* dst = s + i * s_stride + r0;
      for (int64_t r = 0; r < count; ++r) dst[r] = accumulate ? dst[r] + sums[r] : sums[r];
    }
  }
}

// acc_i[0..d) += sum over `rows` slots (`stride` floats apart) of p_i[r] v_r for H heads i sharing
// one KV head (acc_i at acc + i * acc_stride, p_i at p + i * p_stride): sixteen columns at a time,
// each value row loaded once for all H; d a multiple of 8.
template <int H>
LISA_AVX2 inline void accumulate_heads_avx2(float* acc, int64_t acc_stride, const float* p, int64_t p_stride,
                                            const float* v, int64_t rows, int64_t stride, int64_t d) {
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    __m256 a[H][2];
    for (int i = 0; i < H; ++i) {
      a[i][0] = _mm256_loadu_ps(acc + i * acc_stride + c);
      a[i][1] = _mm256_loadu_ps(acc + i * acc_stride + c + 8);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 v0 = _mm256_loadu_ps(v + r * stride + c), v1 = _mm256_loadu_ps(v + r * stride + c + 8);
      for (int i = 0; i < H; ++i) {
        const __m256 w = _mm256_broadcast_ss(p + i * p_stride + r);
        a[i][0] = _mm256_fmadd_ps(w, v0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(w, v1, a[i][1]);
      }
    }
    for (int i = 0; i < H; ++i) {
      _mm256_storeu_ps(acc + i * acc_stride + c, a[i][0]);
      _mm256_storeu_ps(acc + i * acc_stride + c + 8, a[i][1]);
    }
  }
  if (c < d) {
    __m256 a[H];
    for (int i = 0; i < H; ++i) a[i] = _mm256_loadu_ps(acc + i * acc_stride + c);
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 v0 = _mm256_loadu_ps(v + r * stride + c);
      for (int i = 0; i < H; ++i) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i * p_stride + r), v0, a[i]);
    }
    for (int i = 0; i < H; ++i) _mm256_storeu_ps(acc + i * acc_stride + c, a[i]);
  }
}

// accumulate_heads_avx2 for any number of heads g, four at a time.
inline void group_accumulate_values_avx2(float* acc, int64_t acc_stride, const float* p, int64_t p_stride, int64_t g,
                                         const float* v, int64_t rows, int64_t stride, int64_t d) {
  for (int64_t i = 0; i < g; i += 4) {
    float* a = acc + i * acc_stride;
    const float* w = p + i * p_stride;
    switch (std::min<int64_t>(4, g - i)) {
      case 1: accumulate_heads_avx2<1>(a, acc_stride, w, p_stride, v, rows, stride, d); break;
      case 2: accumulate_heads_avx2<2>(a, acc_stride, w, p_stride, v, rows, stride, d); break;
      case 3: accumulate_heads_avx2<3>(a, acc_stride, w, p_stride, v, rows, stride, d); break;
      default: accumulate_heads_avx2<4>(a, acc_stride, w, p_stride, v, rows, stride, d); break;
    }
  }
}

// Logits of g query heads that share KV head kv_head (q: g rows of d), over keys j < n:
// s[i * s_stride + j] = scale * q_i . K[j]. Each key row is read from memory once for all g.
template <typename T>
void key_logits(float* s, int64_t s_stride, const T* q, int64_t g, const T* keys, const PagedSeq& seq,
                int64_t kv_head, int64_t d, int64_t n, float scale) {
  const int64_t stride = seq.kv_heads * d;  // from one slot to the next within a block
  if constexpr (kWidenable<T>) {
    if (use_avx2<T>(d)) {  // a block's key rows widened once (staged), eight keys at a time
      std::vector<float> qf(g * d), staged(std::is_same_v<T, float> ? 0 : seq.block_size * d);
      widen_avx2(qf.data(), q, g * d);
      seq.for_each_block(0, n, kv_head, d, [&](int64_t offset, int64_t j0, int64_t rows) {
        if constexpr (std::is_same_v<T, float>) {
          group_key_logits_avx2(s + j0, s_stride, qf.data(), g, keys + offset, rows, stride, d, scale);
        } else {
          widen_rows_avx2(staged.data(), keys + offset, rows, stride, d);
          group_key_logits_avx2(s + j0, s_stride, qf.data(), g, staged.data(), rows, d, d, scale);
        }
      });
      return;
    }
  }
  seq.for_each_block(0, n, kv_head, d, [&](int64_t offset, int64_t j0, int64_t rows) {
    const T* k = keys + offset;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < g; ++i) s[i * s_stride + j0 + r] = scale * dot(q + i * d, k + r * stride, d);
  });
}

// The lanes of a and b that lo picks plus those hi picks (indices 16-31 are b's).
LISA_AVX512_BF16 inline __m512 sum_pairs(__m512 a, __m512 b, __m512i lo, __m512i hi) {
  return _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
}

// Lane r of the result: the sum of v[r]'s sixteen lanes. Four rounds each halve the lanes
// that hold a vector's partial sums and pair the vectors up, so that after the last the
// vectors' sums sit in order.
LISA_AVX512_BF16 inline __m512 hsum16x16(const __m512 (&v)[16]) {
  // Round 1 keeps lanes 0-7 + 8-15 of each of a pair; round 2 groups of 4, 3 of 2, 4 of 1.
  const __m512i lo1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i hi1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const __m512i lo2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i hi2 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i lo3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i hi3 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const __m512i lo4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i hi4 = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) w[i] = sum_pairs(v[2 * i], v[2 * i + 1], lo1, hi1);
  for (int i = 0; i < 4; ++i) x[i] = sum_pairs(w[2 * i], w[2 * i + 1], lo2, hi2);
  for (int i = 0; i < 2; ++i) y[i] = sum_pairs(x[2 * i], x[2 * i + 1], lo3, hi3);
  return sum_pairs(y[0], y[1], lo4, hi4);
}

// group_key_logits_avx2 for bfloat16 queries and keys on AVX512-BF16 CPUs, straight from the
// cache rows (no widening): q_i . k_r by vdpbf16ps, 32 products an instruction into float32
// sums (the products are exact; only the order of the sums differs from the float32 path).
// Sixteen keys at a time, their sums reduced together; d a multiple of 32.
LISA_AVX512_BF16 inline void group_key_logits_bf16(float* s, int64_t s_stride, const c10::BFloat16* q, int64_t g,
                                                   const c10::BFloat16* k, int64_t rows, int64_t stride, int64_t d,
                                                   float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t count = std::min<int64_t>(16, rows - r0);
    const c10::BFloat16* key[16];
    for (int64_t r = 0; r < 16; ++r) key[r] = k + (r0 + std::min(r, count - 1)) * stride;  // past the rows: unused
    for (int64_t i = 0; i < g; ++i) {
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; c += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + i * d + c);
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], qv, (__m512bh)_mm512_loadu_si512(key[r] + c));
      }
      _mm512_mask_storeu_ps(s + i * s_stride + r0, static_cast<__mmask16>((1u << count) - 1),
                            _mm512_mul_ps(hsum16x16(acc), vscale));
    }
  }
}

// Whether decode's key logits of type T and head size d run group_key_logits_bf16.
template <typename T>
bool use_bf16_dot(int64_t d) {
  return std::is_same_v<T, c10::BFloat16> && d % 32 == 0 && has_avx512_bf16();
}

// group_key_logits_bf16 where T is bfloat16 (use_bf16_dot says when); never called for others.
template <typename T>
void key_logits_bf16(float* s, int64_t s_stride, const T* q, int64_t g, const T* k, int64_t rows, int64_t stride,
                     int64_t d, float scale) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) group_key_logits_bf16(s, s_stride, q, g, k, rows, stride, d, scale);
}

// Asks for `bytes` bytes from p into L2 ahead of use.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t at = 0; at < bytes; at += 64) prefetch_line_l2(c + at);
}

LISA_AVX2 inline float max_avx2(const float* s, int64_t n) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  float result = hmax(vmax);
  for (; j < n; ++j) result = std::max(result, s[j]);
  return result;
}

// In place: s[0..n) -> exp(s - shift); returns their sum.
LISA_AVX2 inline float exp_shifted_avx2(float* s, int64_t n, float shift) {
  const __m256 vshift = _mm256_set1_ps(shift);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vshift));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = hsum(vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

// In place: s[0..n) -> exp(s - max s); returns 1 / their sum (0 when n == 0).
inline float softmax_inplace(float* s, int64_t n) {
  if (n == 0) return 0.0f;
  if (has_avx2()) return 1.0f / exp_shifted_avx2(s, n, max_avx2(s, n));
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) max_score = std::max(max_score, s[j]);
  float total = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - max_score);
    total += s[j];
  }
  return 1.0f / total;
}

// out[i * d + c] = acc[i * d + c] * inv[i] for g rows of d, as T.
template <typename T>
void write_normalised(T* out, const float* acc, const float* inv, int64_t g, int64_t d) {
  for (int64_t i = 0; i < g; ++i)
    for (int64_t c = 0; c < d; ++c) out[i * d + c] = static_cast<T>(acc[i * d + c] * inv[i]);
}

// For g heads sharing KV head kv_head: out_i = inv[i] * sum_{j<n} p[i * p_stride + j] V[j]
// (out: g rows of d). A block of values is read from memory once and serves all g heads from
// L1. acc is g * d floats of scratch.
template <typename T>
void weighted_values(T* out, const float* p, int64_t p_stride, const float* inv, int64_t g, const T* values,
                     const PagedSeq& seq, int64_t kv_head, int64_t d, int64_t n, float* acc) {
  std::fill(acc, acc + g * d, 0.0f);
  const int64_t stride = seq.kv_heads * d;
  if constexpr (kWidenable<T>) {
    if (use_avx2<T>(d)) {  // a block's value rows widened once (staged) for all g heads
      std::vector<float> staged(std::is_same_v<T, float> ? 0 : seq.block_size * d);
      seq.for_each_block(0, n, kv_head, d, [&](int64_t offset, int64_t j0, int64_t rows) {
        if constexpr (std::is_same_v<T, float>) {
          group_accumulate_values_avx2(acc, d, p + j0, p_stride, g, values + offset, rows, stride, d);
        } else {
          widen_rows_avx2(staged.data(), values + offset, rows, stride, d);
          group_accumulate_values_avx2(acc, d, p + j0, p_stride, g, staged.data(), rows, d, d);
        }
      });
      return write_normalised(out, acc, inv, g, d);
    }
  }
  seq.for_each_block(0, n, kv_head, d, [&](int64_t offset, int64_t j0, int64_t rows) {
    const T* v = values + offset;
    for (int64_t i = 0; i < g; ++i) {
      const float* w = p + i * p_stride + j0;
      float* a = acc + i * d;
      for (int64_t r = 0; r < rows; ++r) {
        const T* vr = v + r * stride;
        for (int64_t c = 0; c < d; ++c) a[c] += w[r] * static_cast<float>(vr[c]);
      }
    }
  });
  write_normalised(out, acc, inv, g, d);
}

// A sequence's first n slots of a paged pool [blocks, block_size, kv_heads, width], widened to
// float32 rows [n, kv_heads * width] once: in a prefill call every query of a chunk reads the
// same keys and values, and walking the block table and widening them again per query cost a
// tenth of LiSA's prefill attention. width * kv_heads a multiple of 8.
template <typename T>
std::vector<float> widen_sequence(const T* pool, const PagedSeq& seq, int64_t n, int64_t width) {
  const int64_t slot = seq.kv_heads * width, blocks = (n + seq.block_size - 1) / seq.block_size;
  std::vector<float> rows(n * slot);
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {  // a long context on every thread
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j = block * seq.block_size, run = std::min(seq.block_size, n - j);
      widen_avx2(rows.data() + j * slot, pool + seq.row(j) * width, run * slot);
    }
  });
  return rows;
}

// A tile of a prefill chunk's query rows: consecutive positions of one sequence, row r seeing
// n_keys[r] keys of its widened rows (widen_sequence). The tile's rows share every block of
// kTileKeys keys while it sits in L1, where row by row each row streamed the sequence's keys
// and values again from beyond L2 (a KV head's values at 2,048 keys fill a Zen 3's L2). Each
// logit and each P V sum is computed as the per-row kernels compute it, in the same order.
constexpr int64_t kTileRows = 8, kTileKeys = 64;

// For tile row r and head i of the g sharing the KV head whose widened keys start at k (rows
// k_stride apart): s[r * s_row + i * s_stride + j] = scale * q[(r * g + i) * d ..] . K[j] for
// first <= j < n_keys[r].
LISA_AVX2 inline void tile_key_logits(float* s, int64_t s_row, int64_t s_stride, const float* q, int64_t g,
                                      const float* k, int64_t k_stride, int64_t d, int64_t first,
                                      const int64_t* n_keys, int64_t rows, float scale) {
  const int64_t most = *std::max_element(n_keys, n_keys + rows);
  for (int64_t j0 = first; j0 < most; j0 += kTileKeys) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t count = std::min(kTileKeys, n_keys[r] - j0);
      if (count > 0)
        group_key_logits_avx2(s + r * s_row + j0, s_stride, q + r * g * d, g, k + j0 * k_stride, count, k_stride, d,
                              scale);
    }
  }
}

// acc[(r * g + i) * d ..] += sum over j < n_keys[r] of p[r * p_row + i * p_stride + j] V[j] for the
// tile's rows r and the g heads sharing the KV head whose widened values start at v.
LISA_AVX2 inline void tile_accumulate_values(float* acc, const float* p, int64_t p_row, int64_t p_stride, int64_t g,
                                             const float* v, int64_t v_stride, int64_t d, const int64_t* n_keys,
                                             int64_t rows) {
  const int64_t most = *std::max_element(n_keys, n_keys + rows);
  for (int64_t j0 = 0; j0 < most; j0 += kTileKeys) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t count = std::min(kTileKeys, n_keys[r] - j0);
      if (count > 0)
        group_accumulate_values_avx2(acc + r * g * d, d, p + r * p_row + j0, p_stride, g, v + j0 * v_stride, count,
                                     v_stride, d);
    }
  }
}

// Heads handled together per work item: the whole GQA group (keys and values read once) when
// there are enough (sequence, KV head) items to keep every thread busy, else one head each.
inline int64_t heads_per_item(int64_t rows, int64_t kv_heads, int64_t group) {
  return rows * kv_heads >= 2 * at::get_num_threads() ? group : 1;
}

// Decode attention on AVX2 CPUs, split over the context (T: float32, bfloat16 or float16; the
// arithmetic is float32). A work item is one sequence's run of keys for every head at once, so
// it streams whole cache rows (the KV heads of a slot are adjacent; reading one head's rows
// alone drew a fifth of the memory bandwidth here), and runs are short enough that even batch 1
// keeps every thread busy. Each block of keys, then of values, is read in one sequential sweep
// into a float32 staging buffer (widened once, whichever heads use it) and the heads work from
// there, a KV head's group together: reading the cache per head or per KV head, rows a slot
// apart, drew memory at a fraction of a sequential sweep's rate here (BENCHMARKS.md). Where the
// CPU has AVX512-BF16, bfloat16 keys skip the staging: their logits are bfloat16 dot products
// straight from the cache rows. While a block is read, the next block of the run is prefetched
// (block-table order defeats the hardware prefetchers). Each item leaves, per head, its largest
// logit, the sum of exp(logit - largest) and the unnormalised P V; a second pass merges the runs
// of each sequence.
//
// The logits are q . K * scale, or (LiSA) what logits.fill computes for each run, from the
// run's rows of the previous layer's logits and its low-rank keys, so that a run reads those
// beside its values in one item; logits.out, when set, receives them for the
// next layer. out and q are [batch, heads, d] (q rows q_stride apart); keys, values: the pools.
template <typename T>
void decode_split_avx2(T* out, const T* q, int64_t q_stride, const T* keys, const T* values, const PagedPool& c,
                       const int32_t* lens, int64_t batch, int64_t heads, int64_t d, float scale,
                       DecodeLogits logits) {
  if (batch == 0) return;
  const int64_t kv_heads = c.kv_heads, group = heads / kv_heads, bs = c.block_size;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max<int64_t>(longest, lens[b]);
  // About four runs per thread over the batch, whole blocks, at least 64 keys.
  const int64_t runs_per_seq = std::max<int64_t>(1, (4 * at::get_num_threads() + batch - 1) / batch);
  int64_t chunk = std::max<int64_t>(64, (longest + runs_per_seq - 1) / runs_per_seq);
  // Whole blocks, and runs that start at multiples of 8 keys: LiSA's aligner then maps the
  // same eight-key groups as in a prefill.
  const int64_t unit = std::lcm<int64_t>(bs, 8);
  chunk = (chunk + unit - 1) / unit * unit;
  std::vector<int64_t> item_seq, item_start, first_item(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    first_item[b] = static_cast<int64_t>(item_seq.size());
    for (int64_t j0 = 0; j0 < lens[b]; j0 += chunk) {
      item_seq.push_back(b);
      item_start.push_back(j0);
    }
  }
  first_item[batch] = static_cast<int64_t>(item_seq.size());
  const int64_t items = first_item[batch], part = d + 2;  // per head: P V, largest logit, sum
  std::vector<float> partial(items * heads * part);
  const int64_t row_stride = kv_heads * d;
  // The block after the one at key j in a run ending at `end`, or null (its rows at most as
  // many as this block's: widen_avx2_ahead asks for no more than it widens).
  auto next_block = [&](const T* pool, const PagedSeq& seq, int64_t j, int64_t end) -> const T* {
    return j + 2 * bs <= end ? pool + seq.row(j + bs) * d : nullptr;
  };
  const bool bf16_dot = q != nullptr && use_bf16_dot<T>(d);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(heads * chunk), qf(heads * d), staged(bs * row_stride);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item_seq[item], j0 = item_start[item], n = std::min(chunk, lens[b] - j0);
      const PagedSeq seq = c.seq(b);
      if (logits.fill != nullptr) {
        (*logits.fill)(b, j0, n, s.data(), chunk);
      } else if (bf16_dot) {  // bfloat16 dot products straight from the cache rows
        const T* qb = q + b * q_stride;
        seq.for_each_block(j0, j0 + n, 0, d, [&](int64_t offset, int64_t j, int64_t rows) {
          const T* next = next_block(keys, seq, j, j0 + n);
          const int64_t share = rows * d;  // of the next block's elements, one KV head's worth
          for (int64_t kv = 0; kv < kv_heads; ++kv) {
            if (next != nullptr) prefetch_l2(next + kv * share, share * sizeof(T));
            key_logits_bf16(s.data() + kv * group * chunk + j - j0, chunk, qb + kv * group * d, group,
                            keys + offset + kv * d, rows, row_stride, d, scale);
          }
        });
      } else {
        widen_avx2(qf.data(), q + b * q_stride, heads * d);
        seq.for_each_block(j0, j0 + n, 0, d, [&](int64_t offset, int64_t j, int64_t rows) {
          widen_avx2_ahead(staged.data(), keys + offset, rows * row_stride, next_block(keys, seq, j, j0 + n));
          for (int64_t kv = 0; kv < kv_heads; ++kv)
            group_key_logits_avx2(s.data() + kv * group * chunk + j - j0, chunk, qf.data() + kv * group * d, group,
                                  staged.data() + kv * d, rows, row_stride, d, scale);
        });
      }
      if (logits.out != nullptr) {
        for (int64_t h = 0; h < heads; ++h)
          std::copy(s.data() + h * chunk, s.data() + h * chunk + n, logits.out + (b * heads + h) * logits.stride + j0);
      }
      float* result = partial.data() + item * heads * part;
      for (int64_t h = 0; h < heads; ++h) {
        float* sh = s.data() + h * chunk;
        const float largest = max_avx2(sh, n);
        result[h * part + d] = largest;
        result[h * part + d + 1] = exp_shifted_avx2(sh, n, largest);
        std::fill(result + h * part, result + h * part + d, 0.0f);
      }
      seq.for_each_block(j0, j0 + n, 0, d, [&](int64_t offset, int64_t j, int64_t rows) {
        widen_avx2_ahead(staged.data(), values + offset, rows * row_stride, next_block(values, seq, j, j0 + n));
        for (int64_t kv = 0; kv < kv_heads; ++kv)
          group_accumulate_values_avx2(result + kv * group * part, part, s.data() + kv * group * chunk + j - j0, chunk,
                                       group, staged.data() + kv * d, rows, row_stride, d);
      });
    }
  });
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(d);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / heads, h = idx % heads;
      std::fill(o.begin(), o.end(), 0.0f);
      float largest = -std::numeric_limits<float>::infinity(), total = 0.0f;
      for (int64_t item = first_item[b]; item < first_item[b + 1]; ++item)
        largest = std::max(largest, partial[(item * heads + h) * part + d]);
      for (int64_t item = first_item[b]; item < first_item[b + 1]; ++item) {
        const float* run = partial.data() + (item * heads + h) * part;
        const float weight = std::exp(run[d] - largest);
        total += weight * run[d + 1];
        for (int64_t i = 0; i < d; ++i) o[i] += weight * run[i];
      }
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // an empty sequence attends to nothing
      for (int64_t i = 0; i < d; ++i) out[idx * d + i] = static_cast<T>(o[i] * inv);
    }
  });
}

}  // namespace lisa_rt
