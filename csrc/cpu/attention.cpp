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

// A prefill chunk of at least kFusedMinChunk queries goes through torch's fused attention (on
// the CPU a flash kernel, whose K/V tiles serve many queries at once as matrix products) over
// its sequence's keys and values gathered out of the pool: at 2,048 tokens of SmolLM2 about
// three times as fast as attend() one query at a time, which reads the whole context again for
// every query (BENCHMARKS.md). Shorter chunks, and decode, stay with attend() and paged.h. (The
// same gathering with plain matrix products did not beat paged.h's loops for the attention that
// also hands its logits on, nor for LiSA's: they write or read [heads, L, n] float32 logits.)
constexpr int64_t kFusedMinChunk = 16;

// Sequence b's first n slots of a pool [blocks, block_size, kv_heads, width]: [kv_heads, n, width].
at::Tensor gather_sequence(const at::Tensor& pool, const at::Tensor& block_tables, int64_t b, int64_t n) {
  const int64_t blocks = (n + pool.size(1) - 1) / pool.size(1);
  const at::Tensor table = block_tables[b].narrow(0, 0, blocks).to(at::kLong);
  if (blocks > 0) {
    const auto [lowest, highest] = at::aminmax(table);
    TORCH_CHECK(lowest.item<int64_t>() >= 0 && highest.item<int64_t>() < pool.size(0),
                "paged attention: block id out of range in the block table of sequence ", b);
  }
  return pool.index_select(0, table).flatten(0, 1).narrow(0, 0, n).permute({1, 0, 2});
}

// out_rows [L, heads, d] = causal attention of the last L queries [L, heads, d] of sequence b
// over its first n keys and values, through at::scaled_dot_product_attention.
void fused_chunk(at::Tensor out_rows, const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                 const at::Tensor& block_tables, int64_t b, int64_t n, double scale) {
  const int64_t L = q.size(0);
  std::optional<at::Tensor> mask;  // query i sees keys 0..n - L + i (L == n: is_causal says so)
  if (L != n) mask = at::ones({L, n}, at::kBool).tril(n - L);
  // In float32 whatever the cache dtype, as every CPU attention kernel here computes (its softmax
  // and P V included); as fast as in bfloat16 on this project's CPU (40 against 42 ms at 2,048).
  auto as_float = [](const at::Tensor& t) { return t.to(at::kFloat).unsqueeze(0); };
  const at::Tensor o = at::scaled_dot_product_attention(
      as_float(q.permute({1, 0, 2})), as_float(gather_sequence(key_cache, block_tables, b, n)),
      as_float(gather_sequence(value_cache, block_tables, b, n)), mask, 0.0, L == n, scale, /*enable_gqa=*/true);
  out_rows.copy_(o.squeeze(0).permute({1, 0, 2}));
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
  std::vector<int64_t> seq_of_token(tokens), one_by_one;  // the queries attend() serves
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t chunk = cu[b + 1] - cu[b];
    TORCH_CHECK(chunk >= 0 && chunk <= lens[b], "paged_prefill_attention: chunk longer than its sequence");
    check_length(lens[b], c);
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) seq_of_token[t] = b;
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t chunk = cu[b + 1] - cu[b];
    if (chunk >= kFusedMinChunk) {
      fused_chunk(out.narrow(0, cu[b], chunk), query.narrow(0, cu[b], chunk), key_cache, value_cache, block_tables, b,
                  lens[b], scale);
    } else {
      for (int64_t t = cu[b]; t < cu[b + 1]; ++t) one_by_one.push_back(t);
    }
  }
  if (one_by_one.empty()) return;
  LISA_DISPATCH_FLOATS(query.scalar_type(), "paged_prefill_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t count = static_cast<int64_t>(one_by_one.size());
    const int64_t g = heads_per_item(count, c.pool.kv_heads, group), items = heads / g;
    at::parallel_for(0, count * items, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t t = one_by_one[idx / items], h = idx % items * g, b = seq_of_token[t];
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
