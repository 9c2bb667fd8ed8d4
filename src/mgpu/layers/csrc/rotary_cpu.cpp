// Rotary position embedding (rotate-half form) in one call, on CPU, float32.
//
// The PyTorch form (rotary.apply_rotary: two slices, a negation, a cat, two products and a sum)
// is seven operators per tensor, each a dispatch and a pass; at a decode step's few tokens that
// overhead is the whole cost, twice per layer (q and k). This kernel computes the same values
// (the products may fuse into one FMA: the last place can differ):
//   out[..., i]        = x[i] * cos[i] - x[i + d/2] * sin[i]
//   out[..., i + d/2]  = x[i + d/2] * cos[i + d/2] + x[i] * sin[i + d/2]
// Shapes: x (tokens, heads, d), last dimension contiguous, any token and head strides (a view of
// the fused qkv projection); cos, sin (tokens, 1, d) contiguous; returns (tokens, heads, d)
// contiguous. float32 only: a version for bfloat16 and float16, rounding where the PyTorch form
// rounds, went through c10's scalar conversions and was 3x slower than the PyTorch form at 512
// tokens (1.0-1.4x faster at one).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

void rotate(const float* x, int64_t token_stride, int64_t head_stride, const float* cos,
            const float* sin, float* out, int64_t tokens, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  // Tokens split between threads only from 64K elements a thread (PyTorch's elementwise grain
  // is 32K): below that, waking a thread on a busy core costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(heads * d, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * d;
      const float* s = sin + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        const float* xr = x + t * token_stride + h * head_stride;
        float* o = out + (t * heads + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float a = xr[i], b = xr[i + half];
          o[i] = a * c[i] - b * s[i];
          o[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

}  // namespace

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "rotary: CPU tensors");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rotary: x (tokens, heads, d), d even, last dimension contiguous");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == x.size(0) &&
                  cos.size(1) == 1 && cos.size(2) == x.size(2) && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "rotary: cos and sin (tokens, 1, d), contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "rotary: float32 x, cos and sin");
  auto out = at::empty(x.sizes(), x.options());
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2);
  rotate(x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(),
         sin.data_ptr<float>(), out.data_ptr<float>(), tokens, heads, d);
  return out;
}
