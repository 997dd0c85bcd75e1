// RoPE (HF half-rotation layout) in place on a layer's new queries and keys, then its keys and
// values into the paged KV cache: one op, because on a GPU each launch of a decode step costs
// microseconds whatever it does.
#include <cstring>

#include "common.h"

namespace lisa_rt {
namespace {

template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t half, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    T* v = x + h * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(v[i]), x2 = static_cast<float>(v[i + half]);
      v[i] = static_cast<T>(x1 * cos[i] - x2 * sin[i]);
      v[i + half] = static_cast<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

void rotary_cache_write_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                            at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            const at::Tensor& cos_sin_cache) {
  check_rotary_cache_write_args(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache);
  const int64_t tokens = query.size(0), dim = query.size(2), half = dim / 2;
  const auto pos = positions.contiguous();
  const auto slots = slot_mapping.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* s = slots.data_ptr<int64_t>();
  // Everything is checked before anything is written.
  const int64_t max_pos = cos_sin_cache.size(0), capacity = key_cache.size(0) * key_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < max_pos, "rotary_cache_write: position ", p[t], " out of range");
    TORCH_CHECK(s[t] < capacity, "rotary_cache_write: slot ", s[t], " beyond the cache (", capacity, ")");
  }
  const float* cache = cos_sin_cache.data_ptr<float>();
  const int64_t key_bytes = key.size(1) * dim * key.element_size();
  const int64_t value_bytes = value.size(1) * value.size(2) * value.element_size();
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  const int64_t vs = value.stride(0) * value.element_size();
  LISA_DISPATCH_FLOATS(query.scalar_type(), "rotary_cache_write", [&] {
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cache + p[t] * dim;
        const float* sin = cos + half;
        rotate_heads(q + t * query.stride(0), query.size(1), half, cos, sin);
        scalar_t* k_row = k + t * key.stride(0);
        rotate_heads(k_row, key.size(1), half, cos, sin);
        if (s[t] < 0) continue;  // a padding token: nothing cached
        std::memcpy(kc + s[t] * key_bytes, k_row, key_bytes);
        std::memcpy(vc + s[t] * value_bytes, v + t * vs, value_bytes);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("rotary_cache_write", &rotary_cache_write_cpu); }

}  // namespace lisa_rt
