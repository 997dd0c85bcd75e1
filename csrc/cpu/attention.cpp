// Attention over the paged KV cache: one query per sequence (decode) or packed causal
// chunks (prefill). Scores and softmax are float32 whatever the cache dtype.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace lisa_rt {
namespace {

struct PagedCache {
  const void* keys;
  const void* values;
  const int32_t* block_tables;
  int64_t max_blocks;   // row length of block_tables
  int64_t block_size;
  int64_t num_blocks;
  int64_t kv_heads;
  int64_t head_dim;
};

// out = softmax(q . K[:n] * scale) V[:n] for one head of one sequence.
template <typename T>
void attend(T* out, const T* q, const PagedCache& c, const int32_t* blocks, int64_t kv_head,
            int64_t n_keys, float scale, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t d = c.head_dim;
  const auto* keys = static_cast<const T*>(c.keys);
  const auto* values = static_cast<const T*>(c.values);
  scores.resize(n_keys);
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) {
    const int64_t block = blocks[j / c.block_size];
    TORCH_CHECK(block >= 0 && block < c.num_blocks, "paged attention: block id ", block, " out of range");
    const int64_t row = (block * c.block_size + j % c.block_size) * c.kv_heads + kv_head;
    scores[j] = dot(q, keys + row * d, d) * scale;
    max_score = std::max(max_score, scores[j]);
  }
  float total = 0;
  for (int64_t j = 0; j < n_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    total += scores[j];
  }
  acc.assign(d, 0.0f);
  for (int64_t j = 0; j < n_keys; ++j) {
    const int64_t block = blocks[j / c.block_size];
    const int64_t row = (block * c.block_size + j % c.block_size) * c.kv_heads + kv_head;
    const T* v = values + row * d;
    const float p = scores[j];
    for (int64_t i = 0; i < d; ++i) acc[i] += p * static_cast<float>(v[i]);
  }
  const float inv = n_keys > 0 ? 1.0f / total : 0.0f;
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(acc[i] * inv);
}

PagedCache make_cache(const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& block_tables) {
  return PagedCache{key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr<int32_t>(),
                    block_tables.size(1), key_cache.size(1), key_cache.size(0), key_cache.size(2),
                    key_cache.size(3)};
}

void check_length(int64_t length, const PagedCache& c) {
  TORCH_CHECK(length >= 0 && length <= c.max_blocks * c.block_size,
              "paged attention: sequence length ", length, " exceeds its block table");
}

void paged_decode_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale) {
  check_decode_args(out, query, key_cache, value_cache, block_tables, seq_lens);
  const PagedCache c = make_cache(key_cache, value_cache, block_tables);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t batch = query.size(0), heads = query.size(1), group = heads / c.kv_heads;
  for (int64_t b = 0; b < batch; ++b) check_length(lens[b], c);
  LISA_DISPATCH_FLOATS(query.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / heads, h = idx % heads;
        attend(o + (b * heads + h) * c.head_dim, q + b * query.stride(0) + h * c.head_dim, c,
               c.block_tables + b * c.max_blocks, h / group, lens[b], static_cast<float>(scale), scores, acc);
      }
    });
  });
}

void paged_prefill_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, const at::Tensor& block_tables,
                                 const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, double scale) {
  check_prefill_args(out, query, key_cache, value_cache, block_tables, cu_query_lens, seq_lens);
  const PagedCache c = make_cache(key_cache, value_cache, block_tables);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  const int64_t batch = seq_lens.size(0), tokens = query.size(0), heads = query.size(1);
  const int64_t group = heads / c.kv_heads;
  TORCH_CHECK(cu[0] == 0 && cu[batch] == tokens, "paged_prefill_attention: cu_query_lens must span the queries");
  std::vector<int64_t> seq_of_token(tokens);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t chunk = cu[b + 1] - cu[b];
    TORCH_CHECK(chunk >= 0 && chunk <= lens[b], "paged_prefill_attention: chunk longer than its sequence");
    check_length(lens[b], c);
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) seq_of_token[t] = b;
  }
  LISA_DISPATCH_FLOATS(query.scalar_type(), "paged_prefill_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t t = idx / heads, h = idx % heads, b = seq_of_token[t];
        // Query t sits at position lens[b] - (cu[b+1] - t) and sees keys up to itself.
        const int64_t n_keys = lens[b] - (cu[b + 1] - t) + 1;
        attend(o + (t * heads + h) * c.head_dim, q + t * query.stride(0) + h * c.head_dim, c,
               c.block_tables + b * c.max_blocks, h / group, n_keys, static_cast<float>(scale), scores, acc);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cpu);
  m.impl("paged_prefill_attention", &paged_prefill_attention_cpu);
}

}  // namespace lisa_rt
