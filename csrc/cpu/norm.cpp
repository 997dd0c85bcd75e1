// RMSNorm, alone and fused with the residual add that precedes it in every layer.
#include <cmath>

#include "common.h"

namespace lisa_rt {
namespace {

template <typename T>
void normalise_row(T* out, const T* in, const T* weight, int64_t hidden, float eps) {
  float sum = dot(in, in, hidden);
  float inv = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) {
    out[i] = static_cast<T>(static_cast<float>(in[i]) * inv * static_cast<float>(weight[i]));
  }
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_args(out, input, weight);
  const int64_t hidden = input.size(-1);
  const int64_t rows = input.numel() / hidden;
  LISA_DISPATCH_FLOATS(input.scalar_type(), "rms_norm", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        normalise_row(o + r * hidden, in + r * hidden, w, hidden, static_cast<float>(eps));
      }
    });
  });
}

void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                            double eps) {
  check_norm_args(input, residual, weight);
  const int64_t hidden = input.size(-1);
  const int64_t rows = input.numel() / hidden;
  LISA_DISPATCH_FLOATS(input.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* x = in + r * hidden;
        scalar_t* h = res + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
          h[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + static_cast<float>(h[i]));
        }
        normalise_row(x, h, w, hidden, static_cast<float>(eps));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}

}  // namespace lisa_rt
