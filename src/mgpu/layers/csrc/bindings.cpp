// The Python module of mgpu's CPU kernels (mgpu.layers.cpu_kernels builds it).
#include <torch/extension.h>

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale, double softcap, int64_t window);
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias);
bool skinny_native_bf16();
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x,
                                            const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps, bool gemma);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache (CPU)");
  m.def("skinny_linear", &skinny_linear, "x W^T + b for a few rows of x (CPU)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
  m.def("skinny_native_bf16", &skinny_native_bf16,
        "whether skinny_linear multiplies bfloat16 by bfloat16 natively (AVX512-BF16)");
  m.def("rms_norm", &rms_norm, "RMSNorm of x + residual, returns (normed, x + residual) (CPU)");
  m.def("rotary", &rotary, "rotate-half rotary embedding of x (tokens, heads, d) (CPU)");
}
