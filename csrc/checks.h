// Argument checks shared by the CPU and CUDA implementations of every op, so both devices
// reject the same calls with the same messages. Only shapes, strides, dtypes and devices are
// checked here; range checks that read index tensors live in the CPU kernels (on CUDA they
// would need a host sync).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <initializer_list>
#include <optional>

namespace lisa_rt {

// [rows, heads, dim] views whose last two dims are packed; the row stride is free, so
// the q/k/v slices of a fused projection can be passed without a copy.
inline void check_packed_heads(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [tokens, heads, head_dim]");
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              " must have packed heads (stride (*, head_dim, 1))");
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), what, ": tensors on different devices");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtype mismatch (", a.scalar_type(),
              " vs ", b.scalar_type(), ")");
}

// Index tensors (positions, slots, tables, lengths) are read by the kernels: same device.
inline void check_device(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device() == like.device(), what, " must be on ", like.device(), ", not ", t.device());
}

inline void check_norm_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() >= 1 && input.is_contiguous(), "rms_norm: input must be contiguous");
  TORCH_CHECK(out.sizes() == input.sizes() && out.is_contiguous(), "rms_norm: out must match input");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(-1) && weight.is_contiguous(),
              "rms_norm: weight must be a contiguous [hidden]");
  check_same(out, input, "rms_norm");
  check_same(weight, input, "rms_norm weight");
}

inline void check_linear_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "linear: input must be [rows, K] and weight [N, K]");
  TORCH_CHECK(input.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
              "linear: tensors must be contiguous");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == input.size(0) && out.size(1) == weight.size(0),
              "linear: out must be [rows, N]");
  check_same(out, input, "linear");
  check_same(weight, input, "linear weight");
  // The kernels read the input and weight while other threads already write out.
  TORCH_CHECK(at::get_overlap_status(out, input) == at::MemOverlapStatus::No &&
                  at::get_overlap_status(out, weight) == at::MemOverlapStatus::No,
              "linear: out must not overlap input or weight");
}

inline void check_silu_and_mul_args(const at::Tensor& out, const at::Tensor& input) {
  TORCH_CHECK(input.is_contiguous() && out.is_contiguous(), "silu_and_mul: tensors must be contiguous");
  TORCH_CHECK(input.size(-1) == 2 * out.size(-1), "silu_and_mul: input must be twice as wide as out");
  TORCH_CHECK(input.numel() == 2 * out.numel(), "silu_and_mul: row counts differ");
  check_same(out, input, "silu_and_mul");
}

// Arguments of rotary_cache_write: query [T, H, d] and key [T, G, d] (heads packed, row
// strides free) rotated by cos_sin_cache [max_positions, d]; key and value [T, G, dv] into
// caches [num_blocks, block_size, G, d | dv] at slot_mapping [T].
inline void check_rotary_cache_write_args(const at::Tensor& positions, const at::Tensor& query,
                                          const at::Tensor& key, const at::Tensor& value,
                                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                                          const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache) {
  check_packed_heads(query, "rotary_cache_write: query");
  check_packed_heads(key, "rotary_cache_write: key");
  check_packed_heads(value, "rotary_cache_write: value");
  check_same(query, key, "rotary_cache_write query/key");
  check_same(key, value, "rotary_cache_write key/value");
  check_same(key, key_cache, "rotary_cache_write key cache");
  check_same(value, value_cache, "rotary_cache_write value cache");
  const int64_t tokens = query.size(0), dim = query.size(2);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == tokens,
              "rotary_cache_write: positions must be int64 [tokens]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens,
              "rotary_cache_write: slot_mapping must be int64 [tokens]");
  TORCH_CHECK(key.size(0) == tokens && value.size(0) == tokens && value.size(1) == key.size(1),
              "rotary_cache_write: query, key and value tokens or key/value heads differ");
  TORCH_CHECK(key.size(2) == dim && dim % 2 == 0, "rotary_cache_write: query and key head dims differ or are odd");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous() &&
                  cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == dim,
              "rotary_cache_write: cos_sin_cache must be float32 [max_positions, head_dim]");
  // Keys and values may differ in width (a LiSA layer caches low-rank keys beside full values),
  // but not in blocks, block size or heads.
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.dim() == 4 &&
                  value_cache.is_contiguous() && value_cache.size(0) == key_cache.size(0) &&
                  value_cache.size(1) == key_cache.size(1) && value_cache.size(2) == key_cache.size(2),
              "rotary_cache_write: caches must be contiguous [num_blocks, block_size, kv_heads, dim] with the "
              "same blocks and heads");
  TORCH_CHECK(key.size(1) == key_cache.size(2) && dim == key_cache.size(3) && value.size(2) == value_cache.size(3),
              "rotary_cache_write: key/value heads or width differ from the cache");
  check_device(positions, query, "rotary_cache_write: positions");
  check_device(slot_mapping, query, "rotary_cache_write: slot_mapping");
  check_device(cos_sin_cache, query, "rotary_cache_write: cos_sin_cache");
}

inline void check_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, const char* op) {
  check_packed_heads(query, op);
  TORCH_CHECK(out.sizes() == query.sizes() && out.is_contiguous(), op, ": out must be contiguous, shaped like query");
  check_same(out, query, op);
  check_same(query, key_cache, op);
  check_same(query, value_cache, op);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.sizes() == key_cache.sizes() &&
                  value_cache.is_contiguous(),
              op, ": caches must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(key_cache.size(3) == query.size(2), op, ": head_dim differs between query and cache");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, op, ": query heads not a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(),
              op, ": block_tables must be contiguous int32 [batch, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == block_tables.size(0),
              op, ": seq_lens must be int32 [batch]");
  check_device(block_tables, query, "block_tables");
  check_device(seq_lens, query, "seq_lens");
}

inline void check_decode_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                              const at::Tensor& value_cache, const at::Tensor& block_tables,
                              const at::Tensor& seq_lens) {
  check_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, "paged_decode_attention");
  TORCH_CHECK(query.size(0) == seq_lens.size(0), "paged_decode_attention: one query per sequence");
}

inline void check_prefill_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                               const at::Tensor& value_cache, const at::Tensor& block_tables,
                               const at::Tensor& cu_query_lens, const at::Tensor& seq_lens) {
  check_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, "paged_prefill_attention");
  TORCH_CHECK(cu_query_lens.scalar_type() == at::kInt && cu_query_lens.dim() == 1 &&
                  cu_query_lens.size(0) == seq_lens.size(0) + 1 && cu_query_lens.is_contiguous(),
              "paged_prefill_attention: cu_query_lens must be int32 [batch + 1]");
  check_device(cu_query_lens, query, "cu_query_lens");
}

// --- LiSA attention ops (paged_attention_scores, lisa_attention) ---

// Index tensors of the packed-chunk attention ops.
inline void check_chunk_indices(const at::Tensor& like, const at::Tensor& block_tables,
                                const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, const char* op) {
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(),
              op, ": block_tables must be contiguous int32 [batch, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == block_tables.size(0),
              op, ": seq_lens must be int32 [batch]");
  TORCH_CHECK(cu_query_lens.scalar_type() == at::kInt && cu_query_lens.dim() == 1 &&
                  cu_query_lens.size(0) == seq_lens.size(0) + 1 && cu_query_lens.is_contiguous(),
              op, ": cu_query_lens must be int32 [batch + 1]");
  check_device(block_tables, like, "block_tables");
  check_device(seq_lens, like, "seq_lens");
  check_device(cu_query_lens, like, "cu_query_lens");
}

// float32 [tokens, heads, max_keys] contiguous logits buffer.
inline void check_scores(const at::Tensor& scores, const at::Tensor& query, const char* op, const char* name) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.dim() == 3 && scores.is_contiguous() &&
                  scores.size(0) == query.size(0) && scores.size(1) == query.size(1),
              op, ": ", name, " must be contiguous float32 [tokens, heads, max_keys]");
  check_device(scores, query, name);
}

inline void check_attention_scores_args(const at::Tensor& out, const at::Tensor& scores, const at::Tensor& query,
                                        const at::Tensor& key_cache, const at::Tensor& value_cache,
                                        const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                                        const at::Tensor& seq_lens) {
  constexpr const char* op = "paged_attention_scores";
  check_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, op);
  check_chunk_indices(query, block_tables, cu_query_lens, seq_lens, op);
  check_scores(scores, query, op, "scores");
}

constexpr int64_t kMaxLisaRank = 256;
constexpr int64_t kMaxLisaWidth = 256;

inline void check_lisa_args(const at::Tensor& out, const std::optional<at::Tensor>& scores_out,
                            const at::Tensor& scores_prev, const at::Tensor& query_lr,
                            const at::Tensor& key_lr_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                            const at::Tensor& seq_lens, const at::Tensor& align_a, const at::Tensor& align_w1,
                            const at::Tensor& align_b1, const at::Tensor& align_w2, const at::Tensor& align_b2) {
  constexpr const char* op = "lisa_attention";
  check_packed_heads(query_lr, "lisa_attention: query_lr");
  check_same(query_lr, key_lr_cache, "lisa_attention query_lr/key_lr_cache");
  check_same(query_lr, value_cache, "lisa_attention query_lr/value_cache");
  check_same(out, value_cache, "lisa_attention out/value_cache");
  TORCH_CHECK(key_lr_cache.dim() == 4 && key_lr_cache.is_contiguous() && value_cache.dim() == 4 &&
                  value_cache.is_contiguous() && key_lr_cache.size(0) == value_cache.size(0) &&
                  key_lr_cache.size(1) == value_cache.size(1) && key_lr_cache.size(2) == value_cache.size(2),
              op, ": caches must be contiguous, key_lr_cache [num_blocks, block_size, kv_heads, rank] and "
              "value_cache [num_blocks, block_size, kv_heads, head_dim]");
  const int64_t tokens = query_lr.size(0), heads = query_lr.size(1), rank = query_lr.size(2);
  const int64_t kv_heads = value_cache.size(2), head_dim = value_cache.size(3);
  TORCH_CHECK(key_lr_cache.size(3) == rank, op, ": rank differs between query_lr and key_lr_cache");
  TORCH_CHECK(rank > 0 && rank % 2 == 0 && rank <= kMaxLisaRank, op, ": rank must be even and in [2, ",
              kMaxLisaRank, "], got ", rank);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, ": query heads not a multiple of kv heads");
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.size(0) == tokens && out.size(1) == heads &&
                  out.size(2) == head_dim,
              op, ": out must be contiguous [tokens, heads, head_dim]");
  check_chunk_indices(query_lr, block_tables, cu_query_lens, seq_lens, op);
  check_scores(scores_prev, query_lr, op, "scores_prev");
  if (scores_out.has_value()) {
    check_scores(*scores_out, query_lr, op, "scores_out");
    TORCH_CHECK(!scores_out->is_same(scores_prev) &&
                    at::get_overlap_status(*scores_out, scores_prev) == at::MemOverlapStatus::No,
                op, ": scores_out must not overlap scores_prev (ping-pong two buffers in a chain)");
  }
  const int64_t width = align_w1.dim() == 2 ? align_w1.size(0) : -1;
  auto weight = [&](const at::Tensor& w, std::initializer_list<int64_t> shape, const char* name) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.sizes() == at::IntArrayRef(shape),
                op, ": ", name, " must be contiguous float32 of shape ", at::IntArrayRef(shape), ", got ",
                w.sizes(), " ", w.scalar_type());
    check_device(w, query_lr, name);
  };
  TORCH_CHECK(width >= 0 && width <= kMaxLisaWidth, op, ": align_w1 must be [width, heads] with width <= ",
              kMaxLisaWidth);
  weight(align_a, {heads, heads}, "align_a");
  weight(align_w1, {width, heads}, "align_w1");
  weight(align_b1, {width}, "align_b1");
  weight(align_w2, {heads, width}, "align_w2");
  weight(align_b2, {heads}, "align_b2");
}

}  // namespace lisa_rt
