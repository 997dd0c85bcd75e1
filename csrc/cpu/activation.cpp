// SwiGLU's gate: silu(gate) * up over the fused gate|up projection.
#include <cmath>

#include "common.h"
#include "vec_avx2.h"

namespace lisa_rt {
namespace {

// One row: o[c] = silu(gate[c]) * up[c].
template <typename T>
void silu_and_mul_row(T* o, const T* gate, const T* up, int64_t width) {
  for (int64_t c = 0; c < width; ++c) {
    const float g = static_cast<float>(gate[c]);
    o[c] = static_cast<T>(g / (1.0f + std::exp(-g)) * static_cast<float>(up[c]));
  }
}

// The same, eight at a time with AVX2 (exp8), then the tail.
template <typename T>
LISA_AVX2 void silu_and_mul_row_avx2(T* o, const T* gate, const T* up, int64_t width) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t c = 0;
  for (; c + 8 <= width; c += 8) {
    const __m256 g = load8(gate + c);
    // silu(g) = g / (1 + e^-g), e^-g capped at e^88 (finite): a very negative g gives a tiny
    // number where std::exp would give 0, and -inf gives -inf where it would give NaN.
    const __m256 e = exp_neg_capped8(g);
    const __m256 r = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), load8(up + c));
    store8(o + c, r);
  }
  silu_and_mul_row(o + c, gate + c, up + c, width - c);
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul_args(out, input);
  const int64_t width = out.size(-1);
  if (width == 0 || out.numel() == 0) return;
  const int64_t rows = out.numel() / width;
  LISA_DISPATCH_FLOATS(input.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Rows in tasks of at least 2,048 elements: a decode step's one row stays on one thread.
    at::parallel_for(0, rows, std::max<int64_t>(1, 2048 / width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = in + r * 2 * width;
        if constexpr (kWidenable<scalar_t>) {
          if (has_avx2()) {
            silu_and_mul_row_avx2(o + r * width, gate, gate + width, width);
            continue;
          }
        }
        silu_and_mul_row(o + r * width, gate, gate + width, width);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("silu_and_mul", &silu_and_mul_cpu); }

}  // namespace lisa_rt
