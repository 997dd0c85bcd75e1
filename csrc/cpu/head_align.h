// The LiSA head aligner (DESIGN section 3) for one query row and a few of its keys:
//   S[:, j] = A a + W2 silu(W1 a + b1) + b2,  a = S_prev[:, j]  (A [h, h], W1 [m, h], b1 [m],
//   W2 [h, m], b2 [h], row-major float32),
// and its backward. The h-vectors of neighbouring keys are neighbours in memory (each head's
// row of logits is contiguous), so the AVX2 versions map eight keys at once, a key per lane;
// the portable versions map one. Shared by the inference kernel (lisa_attention.cpp) and the
// fitter's training kernel (head_align.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "vec_avx2.h"

namespace lisa_rt {

// silu(x) = x / (1 + e^-x) and its derivative sig * (1 + x * (1 - sig)), sig = 1 / (1 + e^-x).
// e^-x is capped at e^88, where both are 0 in float anyway.
LISA_AVX2 inline __m256 sigmoid8(__m256 x) {
  const __m256 e = exp_neg_capped8(x);
  return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(std::min(-x, 88.0f))); }

// acc[b] += sum_k M[b * ld + k] * in[k * in_stride + lane], k < count: B outputs at once, each
// its own chain of FMAs (in order of k), so the chains overlap where one output's would wait on
// the FMA before it.
template <int B>
LISA_AVX2 inline void mix8(__m256 (&acc)[B], const float* M, int64_t ld, const float* in, int64_t in_stride,
                           int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    const __m256 v = _mm256_loadu_ps(in + k * in_stride);
    for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(_mm256_set1_ps(M[b * ld + k]), v, acc[b]);
  }
}

// Hidden units [i0, i0 + B) of keys j..j+7: silu(W1 a + b1) into hidden (8 floats a unit).
template <int B>
struct AlignHidden8 {
  LISA_AVX2 static void run(int64_t i0, float* hidden, const float* a, int64_t a_stride, int64_t heads,
                            const float* W1, const float* b1) {
    __m256 z[B];
    for (int b = 0; b < B; ++b) z[b] = _mm256_set1_ps(b1[i0 + b]);
    mix8<B>(z, W1 + i0 * heads, heads, a, a_stride, heads);
    for (int b = 0; b < B; ++b) _mm256_storeu_ps(hidden + (i0 + b) * 8, _mm256_mul_ps(z[b], sigmoid8(z[b])));
  }
};

// Output heads [h0, h0 + B) of keys j..j+7 (s points at key j): A a + W2 hidden + b2, summed
// in that order.
template <int B>
struct AlignOut8 {
  LISA_AVX2 static void run(int64_t h0, float* s, int64_t s_stride, const float* a, int64_t a_stride,
                            int64_t heads, int64_t width, const float* A, const float* W2, const float* b2,
                            const float* hidden) {
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_set1_ps(b2[h0 + b]);
    mix8<B>(acc, A + h0 * heads, heads, a, a_stride, heads);
    mix8<B>(acc, W2 + h0 * width, width, hidden, 8, width);
    for (int b = 0; b < B; ++b) _mm256_storeu_ps(s + (h0 + b) * s_stride, acc[b]);
  }
};

// Step<B>::run(start, args...) over [0, n) in near-equal blocks of at most 12 (32 -> 11 + 11 +
// 10): each output its own chain of FMAs, enough chains to keep both FMA units busy (an FMA
// waits four cycles on the one before it in its chain), few enough for AVX2's 16 registers.
template <template <int> class Step, typename... Args>
LISA_AVX2 inline void in_blocks(int64_t n, Args... args) {
  constexpr int64_t kMost = 12;
  for (int64_t start = 0; start < n;) {
    const int64_t left = n - start, blocks = (left + kMost - 1) / kMost, size = (left + blocks - 1) / blocks;
    switch (size) {
      case 1: Step<1>::run(start, args...); break;
      case 2: Step<2>::run(start, args...); break;
      case 3: Step<3>::run(start, args...); break;
      case 4: Step<4>::run(start, args...); break;
      case 5: Step<5>::run(start, args...); break;
      case 6: Step<6>::run(start, args...); break;
      case 7: Step<7>::run(start, args...); break;
      case 8: Step<8>::run(start, args...); break;
      case 9: Step<9>::run(start, args...); break;
      case 10: Step<10>::run(start, args...); break;
      case 11: Step<11>::run(start, args...); break;
      default: Step<12>::run(start, args...); break;
    }
    start += size;
  }
}

// Keys j..j+7 of one row: s[hd * s_stride + j + lane] from a = prev_row[k * prev_stride + j + lane]
// (s must not overlap prev_row). scratch holds width x 8 floats.
LISA_AVX2 inline void align_keys8(float* s, int64_t s_stride, const float* prev_row, int64_t prev_stride, int64_t j,
                                  int64_t heads, int64_t width, const float* A, const float* W1, const float* b1,
                                  const float* W2, const float* b2, float* scratch) {
  const float* a = prev_row + j;
  float* hidden = scratch;
  in_blocks<AlignHidden8>(width, hidden, a, prev_stride, heads, W1, b1);
  in_blocks<AlignOut8>(heads, s + j, s_stride, a, prev_stride, heads, width, A, W2, b2, hidden);
}

// Key j alone, as align_keys8. scratch holds heads + width floats.
inline void align_key(float* s, int64_t s_stride, const float* prev_row, int64_t prev_stride, int64_t j,
                      int64_t heads, int64_t width, const float* A, const float* W1, const float* b1,
                      const float* W2, const float* b2, float* scratch) {
  float* a = scratch;
  float* hidden = scratch + heads;
  for (int64_t hd = 0; hd < heads; ++hd) a[hd] = prev_row[hd * prev_stride + j];
  for (int64_t i = 0; i < width; ++i) {
    const float x = dot(W1 + i * heads, a, heads) + b1[i];
    hidden[i] = x * sigmoid(x);
  }
  for (int64_t hd = 0; hd < heads; ++hd)
    s[hd * s_stride + j] = dot(A + hd * heads, a, heads) + dot(W2 + hd * width, hidden, width) + b2[hd];
}

// Where the backward kernels sum the parameters' gradients: per element of A, W1, b1, W2, b2
// (in that order, each row-major), 8 lane-wise partial sums.
struct AlignGradSums {
  float* A;
  float* W1;
  float* b1;
  float* W2;
  float* b2;

  static int64_t elements(int64_t heads, int64_t width) { return heads * heads + 2 * width * heads + width + heads; }

  AlignGradSums(float* base, int64_t heads, int64_t width)
      : A(base), W1(A + heads * heads * 8), b1(W1 + width * heads * 8), W2(b1 + width * 8), b2(W2 + heads * width * 8) {}
};

// Backward of align_keys8 for keys j..j+7 of one row, of which the first `valid` take part
// (the others count as zero gradient and are written 0): from g = grad_row[k * g_stride + j + lane],
//   grad_a = A^T g + W1^T (silu'(z) * W2^T g),  z = W1 a + b1,
// into grad_a_row, and the parameters' gradients added into sums. scratch: (2 heads + 2 width) x 8.
LISA_AVX2 inline void align_keys8_backward(
    float* grad_a_row, int64_t grad_a_stride, const float* prev_row, int64_t prev_stride, const float* grad_row,
    int64_t g_stride, int64_t j, int64_t valid, int64_t heads, int64_t width, const float* A, const float* W1,
    const float* b1, const float* W2, AlignGradSums sums, float* scratch) {
  float* a = scratch;
  float* g = a + heads * 8;
  float* hidden = g + heads * 8;
  float* dz = hidden + width * 8;
  // Invalid lanes read as zero: logits past the diagonal may hold anything (-inf, NaN).
  const __m256 live = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  for (int64_t hd = 0; hd < heads; ++hd) {
    _mm256_storeu_ps(a + hd * 8, _mm256_and_ps(live, _mm256_loadu_ps(prev_row + hd * prev_stride + j)));
    const __m256 gk = _mm256_and_ps(live, _mm256_loadu_ps(grad_row + hd * g_stride + j));
    _mm256_storeu_ps(g + hd * 8, gk);
    _mm256_storeu_ps(sums.b2 + hd * 8, _mm256_add_ps(_mm256_loadu_ps(sums.b2 + hd * 8), gk));
  }
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < width; ++i) {
    __m256 z = _mm256_set1_ps(b1[i]), u = _mm256_setzero_ps();
    for (int64_t hd = 0; hd < heads; ++hd) {
      z = _mm256_fmadd_ps(_mm256_set1_ps(W1[i * heads + hd]), _mm256_loadu_ps(a + hd * 8), z);
      u = _mm256_fmadd_ps(_mm256_set1_ps(W2[hd * width + i]), _mm256_loadu_ps(g + hd * 8), u);
    }
    const __m256 sig = sigmoid8(z);
    _mm256_storeu_ps(hidden + i * 8, _mm256_mul_ps(z, sig));
    const __m256 slope = _mm256_mul_ps(sig, _mm256_fmadd_ps(z, _mm256_sub_ps(one, sig), one));
    const __m256 d = _mm256_and_ps(live, _mm256_mul_ps(u, slope));
    _mm256_storeu_ps(dz + i * 8, d);
    _mm256_storeu_ps(sums.b1 + i * 8, _mm256_add_ps(_mm256_loadu_ps(sums.b1 + i * 8), d));
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* w1 = sums.W1 + (i * heads + hd) * 8;
      _mm256_storeu_ps(w1, _mm256_fmadd_ps(d, _mm256_loadu_ps(a + hd * 8), _mm256_loadu_ps(w1)));
    }
  }
  for (int64_t k = 0; k < heads; ++k) {
    const __m256 gk = _mm256_loadu_ps(g + k * 8);
    for (int64_t e = 0; e < heads; ++e) {
      float* ga = sums.A + (k * heads + e) * 8;
      _mm256_storeu_ps(ga, _mm256_fmadd_ps(gk, _mm256_loadu_ps(a + e * 8), _mm256_loadu_ps(ga)));
    }
    for (int64_t i = 0; i < width; ++i) {
      float* gw = sums.W2 + (k * width + i) * 8;
      _mm256_storeu_ps(gw, _mm256_fmadd_ps(gk, _mm256_loadu_ps(hidden + i * 8), _mm256_loadu_ps(gw)));
    }
  }
  for (int64_t e = 0; e < heads; ++e) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < heads; ++k) acc = _mm256_fmadd_ps(_mm256_set1_ps(A[k * heads + e]), _mm256_loadu_ps(g + k * 8), acc);
    for (int64_t i = 0; i < width; ++i)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(W1[i * heads + e]), _mm256_loadu_ps(dz + i * 8), acc);
    _mm256_storeu_ps(grad_a_row + e * grad_a_stride + j, acc);
  }
}

// Key j alone, as align_keys8_backward with one valid key; its sums go to lane 0.
inline void align_key_backward(float* grad_a_row, int64_t grad_a_stride, const float* prev_row, int64_t prev_stride,
                               const float* grad_row, int64_t g_stride, int64_t j, int64_t heads, int64_t width,
                               const float* A, const float* W1, const float* b1, const float* W2, AlignGradSums sums,
                               float* scratch) {
  float* a = scratch;
  float* g = a + heads;
  float* hidden = g + heads;
  float* dz = hidden + width;
  for (int64_t hd = 0; hd < heads; ++hd) {
    a[hd] = prev_row[hd * prev_stride + j];
    g[hd] = grad_row[hd * g_stride + j];
    sums.b2[hd * 8] += g[hd];
  }
  for (int64_t i = 0; i < width; ++i) {
    const float z = dot(W1 + i * heads, a, heads) + b1[i];
    float u = 0;
    for (int64_t hd = 0; hd < heads; ++hd) u += W2[hd * width + i] * g[hd];
    const float sig = sigmoid(z);
    hidden[i] = z * sig;
    dz[i] = u * sig * (1.0f + z * (1.0f - sig));
    sums.b1[i * 8] += dz[i];
    for (int64_t hd = 0; hd < heads; ++hd) sums.W1[(i * heads + hd) * 8] += dz[i] * a[hd];
  }
  for (int64_t k = 0; k < heads; ++k) {
    for (int64_t e = 0; e < heads; ++e) sums.A[(k * heads + e) * 8] += g[k] * a[e];
    for (int64_t i = 0; i < width; ++i) sums.W2[(k * width + i) * 8] += g[k] * hidden[i];
  }
  for (int64_t e = 0; e < heads; ++e) {
    float acc = 0;
    for (int64_t k = 0; k < heads; ++k) acc += A[k * heads + e] * g[k];
    for (int64_t i = 0; i < width; ++i) acc += W1[i * heads + e] * dz[i];
    grad_a_row[e * grad_a_stride + j] = acc;
  }
}

}  // namespace lisa_rt
