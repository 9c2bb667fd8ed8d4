// Rotary position embedding (rotate-half form) in one call, on CPU: float32, bfloat16, float16.
//
// The PyTorch form (rotary.apply_rotary: two slices, a negation, a cat, two products and a sum)
// is seven operators per tensor, each a dispatch and a pass; at a decode step's few tokens that
// overhead is the whole cost, twice per layer (q and k). This kernel computes the same values:
//   out[..., i]        = x[i] * cos[i] - x[i + d/2] * sin[i]
//   out[..., i + d/2]  = x[i + d/2] * cos[i + d/2] + x[i] * sin[i + d/2]
// In float32 the products may fuse into one FMA (the last place can differ). In bfloat16 and
// float16 it rounds where the PyTorch form's operators round: each product (exact in float32)
// to the dtype, then their float32 sum to the dtype, so the result is the PyTorch form's bit for
// bit. The vectors of vec.h do the conversions; a first half-precision version that went through
// c10's scalar conversions was 3x slower than the PyTorch form at 512 tokens.
// Shapes: x (tokens, heads, d), last dimension contiguous, any token and head strides (a view of
// the fused qkv projection); cos, sin (tokens, 1, d) contiguous, x's dtype; returns (tokens,
// heads, d) contiguous.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>

namespace {

// One element pair in T's arithmetic, for the lanes past the last whole vector.
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void rotate(const T* x, int64_t token_stride, int64_t head_stride, const T* cos, const T* sin,
            T* out, int64_t tokens, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  // Tokens split between threads only from 64K elements a thread (PyTorch's elementwise grain
  // is 32K): below that, waking a thread on a busy core costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(heads * d, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * d;
      const T* s = sin + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = x + t * token_stride + h * head_stride;
        T* o = out + (t * heads + h) * d;
        int64_t i = 0;
        for (; i + V <= half; i += V) {
          const vf a = load(xr + i), b = load(xr + i + half);
          store(o + i, round_to<T>(a * load(c + i)) - round_to<T>(b * load(s + i)));
          store(o + i + half,
                round_to<T>(b * load(c + i + half)) + round_to<T>(a * load(s + i + half)));
        }
        for (; i < half; ++i) {
          const float a = static_cast<float>(xr[i]), b = static_cast<float>(xr[i + half]);
          o[i] = static_cast<T>(rounded<T>(a * static_cast<float>(c[i])) -
                                rounded<T>(b * static_cast<float>(s[i])));
          o[i + half] = static_cast<T>(rounded<T>(b * static_cast<float>(c[i + half])) +
                                       rounded<T>(a * static_cast<float>(s[i + half])));
        }
      }
    }
  });
}

template <typename T>
void rotate_tensor(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                   at::Tensor& out) {
  rotate(x.data_ptr<T>(), x.stride(0), x.stride(1), cos.data_ptr<T>(), sin.data_ptr<T>(),
         out.data_ptr<T>(), x.size(0), x.size(1), x.size(2));
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
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                  cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "rotary: x, cos and sin of one dtype: float32, bfloat16 or float16");
  auto out = at::empty(x.sizes(), x.options());
  switch (dtype) {
    case at::kFloat: rotate_tensor<float>(x, cos, sin, out); break;
    case at::kBFloat16: rotate_tensor<at::BFloat16>(x, cos, sin, out); break;
    default: rotate_tensor<at::Half>(x, cos, sin, out); break;
  }
  return out;
}
