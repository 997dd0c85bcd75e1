// Rotary position embedding (HF half-rotation layout) applied in place to queries and keys.
#include "common.h"

namespace lisa_rt {
namespace {

template <typename T>
void rotate_heads(T* x, int64_t row_stride, int64_t t, int64_t heads, int64_t half,
                  const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    T* v = x + t * row_stride + h * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(v[i]), x2 = static_cast<float>(v[i + half]);
      v[i] = static_cast<T>(x1 * cos[i] - x2 * sin[i]);
      v[i + half] = static_cast<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          const at::Tensor& cos_sin_cache) {
  check_rotary_args(positions, query, key, cos_sin_cache);
  const int64_t dim = query.size(2);
  const int64_t tokens = query.size(0), half = dim / 2, max_pos = cos_sin_cache.size(0);
  const auto pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < max_pos, "rotary_embedding: position ", p[t], " out of range");
  }
  const float* cache = cos_sin_cache.data_ptr<float>();
  LISA_DISPATCH_FLOATS(query.scalar_type(), "rotary_embedding", [&] {
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cache + p[t] * dim;
        const float* sin = cos + half;
        rotate_heads(q, query.stride(0), t, query.size(1), half, cos, sin);
        rotate_heads(k, key.stride(0), t, key.size(1), half, cos, sin);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }

}  // namespace lisa_rt
