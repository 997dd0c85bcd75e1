// SwiGLU's gate: silu(gate) * up over the fused gate|up projection.
#include <cmath>

#include "common.h"

namespace lisa_rt {
namespace {

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul_args(out, input);
  const int64_t width = out.size(-1);
  const int64_t rows = out.numel() / width;
  LISA_DISPATCH_FLOATS(input.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * width, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t r = idx / width, c = idx % width;
        const float gate = static_cast<float>(in[r * 2 * width + c]);
        const float up = static_cast<float>(in[r * 2 * width + width + c]);
        o[idx] = static_cast<scalar_t>(gate / (1.0f + std::exp(-gate)) * up);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) { m.impl("silu_and_mul", &silu_and_mul_cpu); }

}  // namespace lisa_rt
