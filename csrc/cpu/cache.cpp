// Writes new keys and values into the paged KV cache.
#include <cstring>

#include "common.h"

namespace lisa_rt {
namespace {

void cache_write_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                     at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_cache_write_args(key, value, key_cache, value_cache, slot_mapping);
  const auto slots = slot_mapping.contiguous();
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t tokens = key.size(0);
  const int64_t capacity = key_cache.size(0) * key_cache.size(1);
  const int64_t key_bytes = key.size(1) * key.size(2) * key.element_size();
  const int64_t value_bytes = value.size(1) * value.size(2) * value.element_size();
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  const int64_t ks = key.stride(0) * key.element_size(), vs = value.stride(0) * value.element_size();
  for (int64_t t = 0; t < tokens; ++t) {
    if (s[t] < 0) continue;  // padding token
    TORCH_CHECK(s[t] < capacity, "cache_write: slot ", s[t], " beyond the cache (", capacity, ")");
    std::memcpy(kc + s[t] * key_bytes, k + t * ks, key_bytes);
    std::memcpy(vc + s[t] * value_bytes, v + t * vs, value_bytes);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("cache_write", &cache_write_cpu); }

}  // namespace lisa_rt
