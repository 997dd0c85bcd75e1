// The fitter's training kernels on the CPU: the LiSA head aligner over whole causal logits
// tensors [B, h, n, n] (query i, key j <= i), forward and backward.
//
// In torch the aligner is three batched GEMMs with an inner size of h (9 for SmolLM2) over
// every (i, j), plus the elementwise work between them, all of it twice over the masked half.
// Here each (row, key) maps its h-vector in registers (eight keys per AVX2 lane set, see
// head_align.h) and keys past the diagonal are skipped. The parameters' gradients are summed
// per query row, then over rows in a fixed order, so the result does not depend on threads.
#include <vector>

#include "head_align.h"

namespace lisa_rt {
namespace {

void check_align_args(const char* op, const at::Tensor& scores, const at::Tensor& align_a,
                      const at::Tensor& align_w1, const at::Tensor& align_b1, const at::Tensor& align_w2) {
  TORCH_CHECK(scores.dim() == 4 && scores.size(2) == scores.size(3), op,
              ": scores must be [B, heads, n, n], got ", scores.sizes());
  const int64_t heads = scores.size(1), width = align_w1.size(0);
  TORCH_CHECK(align_a.dim() == 2 && align_a.size(0) == heads && align_a.size(1) == heads, op, ": align_a must be [",
              heads, ", ", heads, "], got ", align_a.sizes());
  TORCH_CHECK(align_w1.dim() == 2 && align_w1.size(1) == heads, op, ": align_w1 must be [m, ", heads, "], got ",
              align_w1.sizes());
  TORCH_CHECK(align_b1.dim() == 1 && align_b1.size(0) == width, op, ": align_b1 must be [", width, "], got ",
              align_b1.sizes());
  TORCH_CHECK(align_w2.dim() == 2 && align_w2.size(0) == heads && align_w2.size(1) == width, op,
              ": align_w2 must be [", heads, ", ", width, "], got ", align_w2.sizes());
  for (const at::Tensor* t : {&scores, &align_a, &align_w1, &align_b1, &align_w2}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(), op,
                ": tensors must be contiguous float32 on the CPU");
  }
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              op, ": ", name, " must be contiguous float32 of shape ", like.sizes(), " on the CPU, got ", t.sizes());
}

// Query row of flat index idx in [0, B n): rows are taken short and long alternately
// (0, n-1, 1, n-2, ...), so that the even chunks at::parallel_for hands out cost the same.
inline int64_t balanced_row(int64_t idx, int64_t n) {
  const int64_t b = idx / n, k = idx % n;
  return b * n + (k % 2 == 0 ? k / 2 : n - 1 - k / 2);
}

void causal_head_align_cpu(at::Tensor& out, const at::Tensor& scores, const at::Tensor& align_a,
                           const at::Tensor& align_w1, const at::Tensor& align_b1, const at::Tensor& align_w2,
                           const at::Tensor& align_b2) {
  constexpr const char* op = "causal_head_align";
  check_align_args(op, scores, align_a, align_w1, align_b1, align_w2);
  check_like(op, "out", out, scores);
  check_like(op, "align_b2", align_b2, at::empty({scores.size(1)}));
  // align_keys8 writes some heads of a key before it has read them all.
  TORCH_CHECK(at::get_overlap_status(out, scores) == at::MemOverlapStatus::No, op, ": out must not overlap scores");
  const int64_t batch = scores.size(0), heads = scores.size(1), n = scores.size(2), width = align_w1.size(0);
  const int64_t plane = n * n;
  const float* prev = scores.data_ptr<float>();
  float* s = out.data_ptr<float>();
  const float* A = align_a.data_ptr<float>();
  const float* W1 = align_w1.data_ptr<float>();
  const float* b1 = align_b1.data_ptr<float>();
  const float* W2 = align_w2.data_ptr<float>();
  const float* b2 = align_b2.data_ptr<float>();
  const bool vectorised = has_avx2();
  at::parallel_for(0, batch * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((heads + width) * 8);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t row = balanced_row(idx, n), b = row / n, i = row % n;
      const int64_t offset = b * heads * plane + i * n;
      int64_t j = 0;
      // Whole tiles of eight while they fit in the row; lanes past the diagonal are zeroed below.
      if (vectorised) {
        for (; j <= i && j + 8 <= n; j += 8)
          align_keys8(s + offset, plane, prev + offset, plane, j, heads, width, A, W1, b1, W2, b2, scratch.data());
      }
      for (; j <= i; ++j) align_key(s + offset, plane, prev + offset, plane, j, heads, width, A, W1, b1, W2, b2, scratch.data());
      for (int64_t hd = 0; hd < heads; ++hd) std::fill(s + offset + hd * plane + i + 1, s + offset + hd * plane + n, 0.0f);
    }
  });
}

void causal_head_align_backward_cpu(at::Tensor& grad_scores, at::Tensor& grad_a, at::Tensor& grad_w1,
                                    at::Tensor& grad_b1, at::Tensor& grad_w2, at::Tensor& grad_b2,
                                    const at::Tensor& grad_out, const at::Tensor& scores, const at::Tensor& align_a,
                                    const at::Tensor& align_w1, const at::Tensor& align_b1,
                                    const at::Tensor& align_w2) {
  constexpr const char* op = "causal_head_align_backward";
  check_align_args(op, scores, align_a, align_w1, align_b1, align_w2);
  check_like(op, "grad_out", grad_out, scores);
  check_like(op, "grad_scores", grad_scores, scores);
  check_like(op, "grad_a", grad_a, align_a);
  check_like(op, "grad_w1", grad_w1, align_w1);
  check_like(op, "grad_b1", grad_b1, align_b1);
  check_like(op, "grad_w2", grad_w2, align_w2);
  check_like(op, "grad_b2", grad_b2, at::empty({scores.size(1)}));
  const int64_t batch = scores.size(0), heads = scores.size(1), n = scores.size(2), width = align_w1.size(0);
  const int64_t plane = n * n, params = AlignGradSums::elements(heads, width);
  const float* prev = scores.data_ptr<float>();
  const float* g = grad_out.data_ptr<float>();
  float* ga = grad_scores.data_ptr<float>();
  const float* A = align_a.data_ptr<float>();
  const float* W1 = align_w1.data_ptr<float>();
  const float* b1 = align_b1.data_ptr<float>();
  const float* W2 = align_w2.data_ptr<float>();
  // Each query row's parameter gradients, [B n, params] in double.
  std::vector<double> row_sums(batch * n * params);
  const bool vectorised = has_avx2();
  at::parallel_for(0, batch * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((heads + width) * 16), lanes(params * 8);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t row = balanced_row(idx, n), b = row / n, i = row % n;
      const int64_t offset = b * heads * plane + i * n;
      std::fill(lanes.begin(), lanes.end(), 0.0f);
      const AlignGradSums sums(lanes.data(), heads, width);
      int64_t j = 0;
      if (vectorised) {
        for (; j <= i && j + 8 <= n; j += 8)
          align_keys8_backward(ga + offset, plane, prev + offset, plane, g + offset, plane, j, std::min<int64_t>(8, i + 1 - j),
                               heads, width, A, W1, b1, W2, sums, scratch.data());
      }
      for (; j <= i; ++j)
        align_key_backward(ga + offset, plane, prev + offset, plane, g + offset, plane, j, heads, width, A, W1, b1, W2,
                           sums, scratch.data());
      // (A last tile's lanes past the diagonal were written 0 already.)
      for (int64_t hd = 0; hd < heads; ++hd)
        std::fill(ga + offset + hd * plane + j, ga + offset + hd * plane + n, 0.0f);
      double* mine = row_sums.data() + row * params;
      for (int64_t p = 0; p < params; ++p) {
        double sum = 0;
        for (int lane = 0; lane < 8; ++lane) sum += lanes[p * 8 + lane];
        mine[p] = sum;
      }
    }
  });
  // The parameter gradients: row sums in row order (AlignGradSums' layout, packed).
  std::vector<float*> outs = {grad_a.data_ptr<float>(), grad_w1.data_ptr<float>(), grad_b1.data_ptr<float>(),
                              grad_w2.data_ptr<float>(), grad_b2.data_ptr<float>()};
  const std::vector<int64_t> sizes = {heads * heads, width * heads, width, heads * width, heads};
  at::parallel_for(0, params, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      double sum = 0;
      for (int64_t row = 0; row < batch * n; ++row) sum += row_sums[row * params + p];
      int64_t k = 0, local = p;
      while (local >= sizes[k]) local -= sizes[k++];
      outs[k][local] = static_cast<float>(sum);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) {
  m.impl("causal_head_align", &causal_head_align_cpu);
  m.impl("causal_head_align_backward", &causal_head_align_backward_cpu);
}

}  // namespace lisa_rt
