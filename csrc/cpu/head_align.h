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

// Keys j..j+7 of one row: s[hd * s_stride + j + lane] from a = prev_row[k * prev_stride + j + lane].
// scratch holds (heads + width) x 8 floats.
LISA_AVX2 inline void align_keys8(float* s, int64_t s_stride, const float* prev_row,
                                                           int64_t prev_stride, int64_t j, int64_t heads,
                                                           int64_t width, const float* A, const float* W1,
                                                           const float* b1, const float* W2, const float* b2,
                                                           float* scratch) {
  float* a = scratch;
  float* hidden = scratch + heads * 8;
  for (int64_t hd = 0; hd < heads; ++hd) _mm256_storeu_ps(a + hd * 8, _mm256_loadu_ps(prev_row + hd * prev_stride + j));
  for (int64_t i = 0; i < width; ++i) {
    __m256 x = _mm256_set1_ps(b1[i]);
    for (int64_t hd = 0; hd < heads; ++hd) x = _mm256_fmadd_ps(_mm256_set1_ps(W1[i * heads + hd]), _mm256_loadu_ps(a + hd * 8), x);
    _mm256_storeu_ps(hidden + i * 8, _mm256_mul_ps(x, sigmoid8(x)));
  }
  for (int64_t hd = 0; hd < heads; ++hd) {
    __m256 acc = _mm256_set1_ps(b2[hd]);
    for (int64_t k = 0; k < heads; ++k) acc = _mm256_fmadd_ps(_mm256_set1_ps(A[hd * heads + k]), _mm256_loadu_ps(a + k * 8), acc);
    for (int64_t i = 0; i < width; ++i)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(W2[hd * width + i]), _mm256_loadu_ps(hidden + i * 8), acc);
    _mm256_storeu_ps(s + hd * s_stride + j, acc);
  }
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
