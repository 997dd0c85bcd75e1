// The op schemas of torch.ops.lisa_rt.* and the Python module stub of lisa_rt._C.
//
// Every op writes its result in place into tensors it is given (`Tensor(a!)`), so that a
// decode step allocates nothing and can be captured in a CUDA graph. Per-device kernels are
// registered with TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cpp.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/vec_avx2.h"

extern "C" {
// Importing lisa_rt._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

namespace {

// How many threads one parallel region of the CPU kernels runs on. at::parallel_for is a
// header template: in a library compiled without OpenMP it runs on the calling thread alone,
// whatever torch.get_num_threads() says (lisa-rt's kernels did, unnoticed, until 2026-11-28).
int64_t kernel_threads() {
  const int64_t threads = at::get_num_threads();
  std::vector<std::atomic<bool>> seen(threads);  // by thread number: each thread marks its own
  at::parallel_for(0, 64 * threads, 1, [&](int64_t, int64_t) { seen[at::get_thread_num() % threads] = true; });
  int64_t count = 0;
  for (const auto& mark : seen) count += mark.load();
  return count;
}

// Which instruction-set path the CPU kernels take here: "avx512-bf16" (AVX2, and bfloat16 dot
// products by AVX512-BF16), "avx2" or "portable" (ATEN_CPU_CAPABILITY can lower it).
std::string kernel_isa() {
  if (lisa_rt::has_avx512_bf16()) return "avx512-bf16";
  return lisa_rt::has_avx2() ? "avx2" : "portable";
}

}  // namespace

TORCH_LIBRARY(lisa_rt, m) {
  // Threads the CPU kernels' parallel regions run on (a build check: torch.get_num_threads()
  // unless the library was compiled without OpenMP).
  m.def("kernel_threads() -> int", &kernel_threads);
  m.def("kernel_isa() -> str", &kernel_isa);
  // out[n, :] = input[n, :] / rms(input[n, :]) * weight
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  // residual += input; input = rms_norm(residual) * weight
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // HF half-rotation RoPE in place on query [T, H, D] and key [T, G, D] at positions [T]
  // (cos_sin_cache [max_pos, D] float32 holds cos in its first half and sin in its second), then
  // the rotated key and value [T, G, Dv] into caches [num_blocks, block_size, G, D | Dv] at
  // slot_mapping [T] (slot = block * block_size + offset; negative slots are skipped).
  m.def("rotary_cache_write(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor value, Tensor(c!) key_cache, Tensor(d!) value_cache, Tensor slot_mapping, Tensor cos_sin_cache) -> ()");
  // out [rows, N] = input [rows, K] @ weight[N, K]^T; streams the weights once for few rows.
  m.def("linear(Tensor(a!) out, Tensor input, Tensor weight) -> ()");
  // linear with weights [N, K] quantized in blocks of 32 along K (lisa_rt/quant.py): data int8
  // [N, K] (q8_0: w = d q) or uint8 [N, K / 2] (q4_1: w = d q + m, two 4-bit q a byte), scales d
  // and, for q4_1, mins m float16 [N, K / 32]. CPU only.
  m.def("linear_quantized(Tensor(a!) out, Tensor input, Tensor data, Tensor scales, Tensor? mins) -> ()");
  // out [N, I] = silu(input[:, :I]) * input[:, I:]
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  // One query per sequence, query/out [B, H, D]; block_tables int32 [B, max_blocks];
  // seq_lens int32 [B] counts every cached token including the current one.
  m.def("paged_decode_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, float scale) -> ()");
  // Causal attention of packed query chunks [T, H, D] over the paged cache; cu_query_lens
  // int32 [B + 1]; the chunk of sequence b holds its last tokens (ending at seq_lens[b]).
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor cu_query_lens, Tensor seq_lens, float scale) -> ()");
  // paged_prefill_attention that also writes the scaled, pre-mask logits scale * q . k into
  // scores, float32 [T, H, max_keys] contiguous (max_keys >= every seq_len): row t, head h,
  // columns j <= p (the row's position); columns past p are left untouched. A full layer runs
  // it when the next layer is LiSA; decode is the chunk-of-one case.
  m.def("paged_attention_scores(Tensor(a!) out, Tensor(b!) scores, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor cu_query_lens, Tensor seq_lens, float scale) -> ()");
  // LiSA attention (DESIGN section 3) of packed query chunks: for key j <= p, with
  // a = scores_prev[t, :, j] (float32 [T, H, max_keys], the previous layer's logits),
  //   S[h, j] = (A a + W2 silu(W1 a + b1) + b2)[h] + delta_scale * query_lr[t, h] . key_lr[j, h / (H / G)]
  // (A [H, H], W1 [m, H], b1 [m], W2 [H, m], b2 [H] float32; query_lr [T, H, r] row stride free,
  // key_lr_cache [num_blocks, block_size, G, r], r even <= 256, m <= 256); out [T, H, D] =
  // softmax(S over j <= p) V. When given, scores_out (float32 [T, H, max_keys], not overlapping
  // scores_prev) receives S for j <= p, for a following LiSA layer.
  m.def("lisa_attention(Tensor(a!) out, Tensor(b!)? scores_out, Tensor scores_prev, Tensor query_lr, Tensor key_lr_cache, Tensor value_cache, Tensor block_tables, Tensor cu_query_lens, Tensor seq_lens, Tensor align_a, Tensor align_w1, Tensor align_b1, Tensor align_w2, Tensor align_b2, float delta_scale) -> ()");
  // The fitter's head aligner over whole causal logits, CPU only (on a GPU the fitter runs it in
  // torch): scores/out float32 [B, H, n, n] contiguous; for keys j <= i,
  //   out[b, :, i, j] = A a + W2 silu(W1 a + b1) + b2,  a = scores[b, :, i, j];
  // out is 0 for j > i, and scores there is never read.
  m.def("causal_head_align(Tensor(a!) out, Tensor scores, Tensor align_a, Tensor align_w1, Tensor align_b1, Tensor align_w2, Tensor align_b2) -> ()");
  // Its backward from grad_out (read for j <= i only): grad_scores (0 for j > i) and the
  // parameters' gradients, all overwritten.
  m.def("causal_head_align_backward(Tensor(a!) grad_scores, Tensor(b!) grad_a, Tensor(c!) grad_w1, Tensor(d!) grad_b1, Tensor(e!) grad_w2, Tensor(f!) grad_b2, Tensor grad_out, Tensor scores, Tensor align_a, Tensor align_w1, Tensor align_b1, Tensor align_w2) -> ()");
}
