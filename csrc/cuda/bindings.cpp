// The CUDA implementations of torch.ops.lisa_rt.*: argument checks, then the launchers of
// cuda/*.cu on torch's current stream of the tensors' device. Nothing here reads device
// memory on the host, so every op is asynchronous and graph-capturable; the scratch of the
// split decode attention comes from torch's caching allocator (inside a CUDA graph capture,
// from the graph's own pool), never from cudaMalloc on the hot path.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_checks.h"
#include "cuda/kernels.h"

namespace lisa_rt {
namespace {

using cuda_checks::check_head_dim;
using cuda_checks::dtype_of;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// `bytes` of scratch on the device of `like`, held until the returned tensor dies (the caching
// allocator keeps it reserved for the stream's work already queued).
at::Tensor workspace(const at::Tensor& like, int64_t bytes) {
  return at::empty({std::max<int64_t>(bytes, 0)}, like.options().dtype(at::kByte));
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_args(out, input, weight);
  const kernels::DType dtype = dtype_of(input, "rms_norm");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = input.size(-1);
  const int64_t rows = hidden == 0 ? 0 : input.numel() / hidden;
  check_launch(kernels::rms_norm(out.data_ptr(), input.data_ptr(), weight.data_ptr(), rows, hidden,
                                 static_cast<float>(eps), dtype, current_stream()),
               "rms_norm");
}

void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm_args(input, residual, weight);
  const kernels::DType dtype = dtype_of(input, "fused_add_rms_norm");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = input.size(-1);
  const int64_t rows = hidden == 0 ? 0 : input.numel() / hidden;
  check_launch(kernels::fused_add_rms_norm(input.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows,
                                           hidden, static_cast<float>(eps), dtype, current_stream()),
               "fused_add_rms_norm");
}

// A decode step's few rows times a small weight take gemv.cu's kernel (cuBLAS waits on
// latency there); every other product goes to cuBLAS through ATen.
void linear_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  check_linear_args(out, input, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto type = input.scalar_type();
  if (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) {
    const kernels::DType dtype = dtype_of(input, "linear");
    const int64_t rows = input.size(0), n = weight.size(0), k = input.size(1);
    if (kernels::gemv_fits(rows, n, k, input.data_ptr(), weight.data_ptr(), dtype)) {
      check_launch(kernels::gemv(out.data_ptr(), input.data_ptr(), weight.data_ptr(), rows, n, k, dtype,
                                 current_stream()),
                   "linear");
      return;
    }
  }
  at::mm_out(out, input, weight.t());
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul_args(out, input);
  const int64_t width = out.size(-1);
  const kernels::DType dtype = dtype_of(input, "silu_and_mul");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = width == 0 ? 0 : out.numel() / width;
  check_launch(kernels::silu_and_mul(out.data_ptr(), input.data_ptr(), rows, width, dtype, current_stream()),
               "silu_and_mul");
}

void rotary_cache_write_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                             at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping,
                             const at::Tensor& cos_sin_cache) {
  check_rotary_cache_write_args(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache);
  const kernels::DType dtype = dtype_of(query, "rotary_cache_write");
  const c10::cuda::CUDAGuard guard(query.device());
  // Positions and slots out of range cannot be rejected without a sync; the kernel skips them.
  check_launch(kernels::rotary_cache_write(
                   positions.data_ptr<int64_t>(), positions.stride(0), query.data_ptr(), query.stride(0),
                   query.size(1), key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), key.size(1),
                   key.size(2), value.size(2), key_cache.data_ptr(), value_cache.data_ptr(),
                   slot_mapping.data_ptr<int64_t>(), slot_mapping.stride(0), key_cache.size(0) * key_cache.size(1),
                   query.size(0), cos_sin_cache.data_ptr<float>(), cos_sin_cache.size(0), dtype, current_stream()),
               "rotary_cache_write");
}

kernels::PagedKVCache paged_cache(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables) {
  return kernels::PagedKVCache{key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr<int32_t>(),
                               block_tables.size(1), key_cache.size(1), key_cache.size(0), key_cache.size(2),
                               key_cache.size(3)};
}

// Sequence lengths and block ids are not range-checked here (that would need a sync): the
// kernels clamp lengths to the block table and read invalid blocks as zeros.
void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, double scale) {
  check_decode_args(out, query, key_cache, value_cache, block_tables, seq_lens);
  check_head_dim(query, "paged_decode_attention");
  const kernels::DType dtype = dtype_of(query, "paged_decode_attention");
  const c10::cuda::CUDAGuard guard(query.device());
  const kernels::PagedKVCache cache = paged_cache(key_cache, value_cache, block_tables);
  const at::Tensor scratch =
      workspace(query, kernels::paged_decode_attention_workspace(query.size(0), query.size(1), cache));
  check_launch(kernels::paged_decode_attention(out.data_ptr(), query.data_ptr(), query.stride(0), query.size(0),
                                               query.size(1), cache, seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
                                               static_cast<float>(scale), scratch.data_ptr(), dtype,
                                               current_stream()),
               "paged_decode_attention");
}

void paged_prefill_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, double scale) {
  check_prefill_args(out, query, key_cache, value_cache, block_tables, cu_query_lens, seq_lens);
  check_head_dim(query, "paged_prefill_attention");
  const kernels::DType dtype = dtype_of(query, "paged_prefill_attention");
  const c10::cuda::CUDAGuard guard(query.device());
  check_launch(kernels::paged_prefill_attention(out.data_ptr(), query.data_ptr(), query.stride(0), query.size(0),
                                                query.size(1), seq_lens.size(0),
                                                paged_cache(key_cache, value_cache, block_tables),
                                                cu_query_lens.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                                                seq_lens.stride(0), static_cast<float>(scale), dtype,
                                                current_stream()),
               "paged_prefill_attention");
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
  m.impl("linear", &linear_cuda);
  m.impl("silu_and_mul", &silu_and_mul_cuda);
  m.impl("rotary_cache_write", &rotary_cache_write_cuda);
  m.impl("paged_decode_attention", &paged_decode_attention_cuda);
  m.impl("paged_prefill_attention", &paged_prefill_attention_cuda);
}

}  // namespace lisa_rt

// --- LiSA attention ops (paged_attention_scores, lisa_attention) ---
namespace lisa_rt {
namespace {

void paged_attention_scores_cuda(at::Tensor& out, at::Tensor& scores, const at::Tensor& query,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                                 const at::Tensor& seq_lens, double scale) {
  check_attention_scores_args(out, scores, query, key_cache, value_cache, block_tables, cu_query_lens, seq_lens);
  check_head_dim(query, "paged_attention_scores");
  const kernels::DType dtype = dtype_of(query, "paged_attention_scores");
  const c10::cuda::CUDAGuard guard(query.device());
  // Lengths beyond the block table or the scores width cannot be rejected without a sync: the
  // kernel clamps them.
  const kernels::PagedKVCache cache = paged_cache(key_cache, value_cache, block_tables);
  const at::Tensor scratch = workspace(query, kernels::paged_attention_scores_workspace(
                                                  query.size(0), query.size(1), seq_lens.size(0), cache, scores.size(2)));
  check_launch(kernels::paged_attention_scores(out.data_ptr(), scores.data_ptr<float>(), scores.size(2),
                                               query.data_ptr(), query.stride(0), query.size(0), query.size(1),
                                               seq_lens.size(0), cache, cu_query_lens.data_ptr<int32_t>(),
                                               seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
                                               static_cast<float>(scale), scratch.data_ptr(), dtype, current_stream()),
               "paged_attention_scores");
}

void lisa_attention_cuda(at::Tensor& out, const std::optional<at::Tensor>& scores_out,
                         const at::Tensor& scores_prev, const at::Tensor& query_lr, const at::Tensor& key_lr_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables,
                         const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, const at::Tensor& align_a,
                         const at::Tensor& align_w1, const at::Tensor& align_b1, const at::Tensor& align_w2,
                         const at::Tensor& align_b2, double delta_scale) {
  check_lisa_args(out, scores_out, scores_prev, query_lr, key_lr_cache, value_cache, block_tables, cu_query_lens,
                  seq_lens, align_a, align_w1, align_b1, align_w2, align_b2);
  // The value head dim follows the attention kernels' limit.
  check_head_dim(out, "lisa_attention");
  const kernels::DType dtype = dtype_of(query_lr, "lisa_attention");
  const c10::cuda::CUDAGuard guard(query_lr.device());
  const kernels::PagedKVCache cache{key_lr_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr<int32_t>(),
                                    block_tables.size(1), value_cache.size(1), value_cache.size(0),
                                    value_cache.size(2), value_cache.size(3)};
  float* scores_out_ptr = scores_out.has_value() ? scores_out->data_ptr<float>() : nullptr;
  const int64_t out_keys = scores_out.has_value() ? scores_out->size(2) : 0;
  const at::Tensor scratch = workspace(
      query_lr, kernels::lisa_attention_workspace(query_lr.size(0), query_lr.size(1), seq_lens.size(0), cache,
                                                  align_w1.size(0), scores_prev.size(2), scores_out.has_value(),
                                                  out_keys));
  check_launch(kernels::lisa_attention(out.data_ptr(), scores_out_ptr, out_keys, scores_prev.data_ptr<float>(),
                                       scores_prev.size(2), query_lr.data_ptr(), query_lr.stride(0),
                                       query_lr.size(2), query_lr.size(0), query_lr.size(1), seq_lens.size(0),
                                       cache, cu_query_lens.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                                       seq_lens.stride(0), align_a.data_ptr<float>(), align_w1.data_ptr<float>(),
                                       align_b1.data_ptr<float>(), align_w2.data_ptr<float>(),
                                       align_b2.data_ptr<float>(), align_w1.size(0),
                                       static_cast<float>(delta_scale), scratch.data_ptr(), dtype,
                                       current_stream()),
               "lisa_attention");
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CUDA, m) {
  m.impl("paged_attention_scores", &paged_attention_scores_cuda);
  m.impl("lisa_attention", &lisa_attention_cuda);
}

}  // namespace lisa_rt
