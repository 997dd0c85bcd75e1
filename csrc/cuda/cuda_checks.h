// What only the CUDA ops check beyond the shared checks of csrc/checks.h: the dtypes the
// kernels are compiled for and the head dims the attention kernels support.
#pragma once

#include "checks.h"
#include "cuda/kernels.h"

namespace lisa_rt::cuda_checks {

inline kernels::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kernels::DType::kFloat32;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    case at::kHalf:
      return kernels::DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": dtype ", t.scalar_type(), " not supported on CUDA (float32, bfloat16, float16)");
  }
}

inline void check_head_dim(const at::Tensor& query, const char* op) {
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(head_dim % 8 == 0 && head_dim <= kernels::kMaxHeadDim, op,
              ": head_dim must be a multiple of 8 and at most ", kernels::kMaxHeadDim, " on CUDA, got ", head_dim);
}

}  // namespace lisa_rt::cuda_checks
