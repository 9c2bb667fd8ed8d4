// RMSNorm with its residual add, one pass per row, on CPU.
//
// The PyTorch form (RMSNorm.forward: add, upcast, F.rms_norm, cast, multiply by the weight) is
// five to seven operators per call, each with its dispatch and a pass over the row; at a decode
// step's few rows that overhead is the whole cost (30 us per call for a 256-wide row, 25 calls
// per step of a 12-layer model). This kernel does the same arithmetic, rounded where the PyTorch
// form rounds, in one call:
//   s        = x + residual            (rounded to the activations' dtype; s = x without residual)
//   h        = s / sqrt(mean(s^2) + eps)          (float32)
//   Llama:     out = weight * round(h)            (round: to the activations' dtype)
//   Gemma:     out = round(h * (1 + weight))      (float32 product, then the cast)
// Shapes: x, residual (rows, hidden) contiguous, same dtype; weight (hidden,) that dtype or
// float32; returns (out, s), both (rows, hidden) in x's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

template <typename T, typename W>
void norm_rows(const T* x, const T* residual, const W* weight, T* out, T* sum, int64_t rows,
               int64_t hidden, float eps, bool gemma) {
  // Rows split between threads only from 64K elements a thread (the elementwise grain of
  // PyTorch is 32K): below that, waking a thread on a busy core costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      // The row the norm is taken of: x + residual, written to sum; x itself without residual.
      const T* sr = xr;
      if (residual != nullptr) {
        T* w = sum + r * hidden;
        const T* rr = residual + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
          w[i] = round_to<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        }
        sr = w;
      }
      float squares = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = static_cast<float>(sr[i]);
        squares += v * v;
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      if (gemma) {
        for (int64_t i = 0; i < hidden; ++i) {
          o[i] = round_to<T>(static_cast<float>(sr[i]) * inv *
                             (1.f + static_cast<float>(weight[i])));
        }
      } else {
        for (int64_t i = 0; i < hidden; ++i) {
          const float h = static_cast<float>(round_to<T>(static_cast<float>(sr[i]) * inv));
          o[i] = round_to<T>(static_cast<float>(weight[i]) * h);
        }
      }
    }
  });
}

template <typename T>
void with_weight(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                 at::Tensor& out, at::Tensor& sum, double eps, bool gemma) {
  const int64_t hidden = x.size(1), rows = x.size(0);
  const T* res = residual == nullptr ? nullptr : residual->data_ptr<T>();
  if (weight.scalar_type() == at::kFloat) {
    norm_rows<T, float>(x.data_ptr<T>(), res, weight.data_ptr<float>(), out.data_ptr<T>(),
                        sum.data_ptr<T>(), rows, hidden, static_cast<float>(eps), gemma);
  } else {
    norm_rows<T, T>(x.data_ptr<T>(), res, weight.data_ptr<T>(), out.data_ptr<T>(),
                    sum.data_ptr<T>(), rows, hidden, static_cast<float>(eps), gemma);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x,
                                            const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps, bool gemma) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm: x (rows, hidden), contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight (hidden,), contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "rms_norm: weight in x's dtype or float32");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type() && residual->device().is_cpu(),
                "rms_norm: residual like x");
  }
  auto out = at::empty_like(x);
  // Without a residual the new residual is x itself, as in the PyTorch form.
  auto sum = residual.has_value() ? at::empty_like(x) : x;
  const at::Tensor* res = residual.has_value() ? &*residual : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: with_weight<float>(x, res, weight, out, sum, eps, gemma); break;
    case at::kBFloat16: with_weight<at::BFloat16>(x, res, weight, out, sum, eps, gemma); break;
    case at::kHalf: with_weight<at::Half>(x, res, weight, out, sum, eps, gemma); break;
    default: TORCH_CHECK(false, "rms_norm: float32, bfloat16 or float16 only");
  }
  return {out, sum};
}
