// Attention over the paged KV cache: one query per sequence (decode) or packed causal
// chunks (prefill). Scores and softmax are float32 whatever the cache dtype.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "paged.h"

namespace lisa_rt {
namespace {

struct PagedCache {
  const void* keys;
  const void* values;
  PagedPool pool;
  int64_t head_dim;
};

// Per-thread scratch: logits then weights (g rows), their 1/sums, and the P V accumulators.
struct Scratch {
  std::vector<float> p, inv, acc;
};

// out_i = softmax(q_i . K[:n] * scale) V[:n] for the g query heads (q, out: g rows of head_dim)
// that share KV head kv_head of sequence b.
template <typename T>
void attend(T* out, const T* q, int64_t g, const PagedCache& c, int64_t b, int64_t kv_head, int64_t n_keys,
            float scale, Scratch& scratch) {
  const PagedSeq seq = c.pool.seq(b);
  const int64_t d = c.head_dim;
  scratch.p.resize(g * n_keys);
  scratch.inv.resize(g);
  scratch.acc.resize(g * d);
  float* p = scratch.p.data();
  key_logits(p, n_keys, q, g, static_cast<const T*>(c.keys), seq, kv_head, d, n_keys, scale);
  for (int64_t i = 0; i < g; ++i) scratch.inv[i] = softmax_inplace(p + i * n_keys, n_keys);
  weighted_values(out, p, n_keys, scratch.inv.data(), g, static_cast<const T*>(c.values), seq, kv_head, d, n_keys,
                  scratch.acc.data());
}

PagedCache make_cache(const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& block_tables) {
  const PagedPool pool{block_tables.data_ptr<int32_t>(), block_tables.size(1), key_cache.size(1), key_cache.size(0),
                       key_cache.size(2)};
  return PagedCache{key_cache.data_ptr(), value_cache.data_ptr(), pool, key_cache.size(3)};
}

void check_length(int64_t length, const PagedCache& c) {
  TORCH_CHECK(length >= 0 && length <= c.pool.max_blocks * c.pool.block_size,
              "paged attention: sequence length ", length, " exceeds its block table");
}

void paged_decode_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale) {
  check_decode_args(out, query, key_cache, value_cache, block_tables, seq_lens);
  const PagedCache c = make_cache(key_cache, value_cache, block_tables);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t batch = query.size(0), heads = query.size(1), group = heads / c.pool.kv_heads;
  for (int64_t b = 0; b < batch; ++b) check_length(lens[b], c);
  LISA_DISPATCH_FLOATS(query.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if constexpr (kWidenable<scalar_t>) {
      if (use_avx2<scalar_t>(c.head_dim)) {
        decode_split_avx2(o, q, query.stride(0), static_cast<const scalar_t*>(c.keys),
                          static_cast<const scalar_t*>(c.values), c.pool, lens, batch, heads, c.head_dim,
                          static_cast<float>(scale), DecodeLogits{});
        return;
      }
    }
    const int64_t g = heads_per_item(batch, c.pool.kv_heads, group), items = heads / g;
    at::parallel_for(0, batch * items, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / items, h = idx % items * g;
        attend(o + (b * heads + h) * c.head_dim, q + b * query.stride(0) + h * c.head_dim, g, c, b, h / group,
               lens[b], static_cast<float>(scale), scratch);
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
  const int64_t group = heads / c.pool.kv_heads;
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
    const int64_t g = heads_per_item(tokens, c.pool.kv_heads, group), items = heads / g;
    at::parallel_for(0, tokens * items, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t t = idx / items, h = idx % items * g, b = seq_of_token[t];
        // Query t sits at position lens[b] - (cu[b+1] - t) and sees keys up to itself.
        const int64_t n_keys = lens[b] - (cu[b + 1] - t) + 1;
        attend(o + (t * heads + h) * c.head_dim, q + t * query.stride(0) + h * c.head_dim, g, c, b, h / group,
               n_keys, static_cast<float>(scale), scratch);
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
