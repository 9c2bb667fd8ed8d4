// y = x W^T + b for the few rows of a decode step, on CPU, reading each weight once from memory.
//
// A decode step multiplies every weight by one row per sequence: the product is a matrix-vector
// one, bound by how fast the weight streams from memory, not by arithmetic. The library kernels
// PyTorch calls for it are tuned for large products (MKL takes a generic path on AMD CPUs, oneDNN
// pays tens of microseconds of set-up per call), so this kernel does just the skinny case: the
// weight's rows are split between the threads in contiguous ranges; a thread walks its rows (one
// at a time for up to 4 rows of x, see FEW), converting each weight vector to float32 once in
// registers and multiplying it into several rows of x (small, in cache), float32 accumulators.
//
// On CPUs with AVX512-BF16 a bfloat16 x times a bfloat16 weight skips the conversion: vdpbf16ps
// multiplies 32 pairs of bfloat16 into 16 float32 lanes (exact products, float32 sums), half the
// instructions per weight byte of the widen-shift-FMA path, which is what the arithmetic-bound
// case of many rows needs (see block_bh).
//
// Shapes:
//   x        (M, K) float32 / bfloat16 / float16 (converted to float32 once, M * K elements,
//            except bfloat16 x with a bfloat16 weight on AVX512-BF16, read as it is)
//   weight   (N, K) float32 / bfloat16 / float16, contiguous
//   bias     (N,) or none, any of the three dtypes
//   returns  (M, N) in x's dtype
// Vectors and their loads are vec.h's: GCC vector extensions of the machine's widest float
// register (the kernel is built with -march=native where it runs), 16 floats with AVX-512, 8
// with AVX2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

// y[m, r] = x[m] . w[r] + bias[r] for M rows of x (row stride K) and R weight rows (row stride
// K); y has row stride ldy. U vectors per step keep at least four independent accumulator chains
// when M * R is small, so that the FMA latency does not bound the stream.
template <typename T, typename O, int M, int R>
inline void block(const float* __restrict__ x, const T* __restrict__ w, const float* bias,
                  int64_t K, O* __restrict__ y, int64_t ldy) {
  constexpr int U = M * R >= 4 ? 1 : 4 / (M * R);
  vf acc[U][M][R] = {};
  int64_t k = 0;
  for (; k + U * V <= K; k += U * V) {
    for (int u = 0; u < U; ++u) {
      vf wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load(w + r * K + k + u * V);
      for (int m = 0; m < M; ++m) {
        const vf xv = load(x + m * K + k + u * V);
        for (int r = 0; r < R; ++r) acc[u][m][r] += xv * wv[r];
      }
    }
  }
  for (; k + V <= K; k += V) {
    for (int m = 0; m < M; ++m) {
      const vf xv = load(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[0][m][r] += xv * load(w + r * K + k);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      vf total = acc[0][m][r];
      for (int u = 1; u < U; ++u) total += acc[u][m][r];
      float s = hsum(total);
      for (int64_t i = k; i < K; ++i) s += x[m * K + i] * static_cast<float>(w[r * K + i]);
      if (bias != nullptr) s += bias[r];
      y[m * ldy + r] = static_cast<O>(s);
    }
  }
}

#if defined(__AVX512BF16__)
constexpr int BV = 32;  // bfloat16 lanes of one 512-bit register
// Independent accumulator chains of block_bh: 8 rather than block's 4 (a 2-core EPYC, AVX-512
// with BF16, the 140M Llama's twelve layers of weights beyond the cache: 8.2 against 10.7 ms at
// 4 rows of x, 8.2 against 8.6 at one), where for float16 weights 4 and 8 measured the same.
constexpr int BH_CHAINS = 8;

inline __m512bh load_bh(const at::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

// The first `left` (< BV) lanes, zeros after: a zero pair adds nothing to the dot product.
inline __m512bh load_bh(const at::BFloat16* p, int64_t left) {
  const __mmask32 mask = (__mmask32(1) << left) - 1;
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
}

// block() for bfloat16 x and weight: the same M x R dot products, 32 elements per instruction,
// the remainder of K through a masked load instead of a scalar loop.
template <typename O, int M, int R>
inline void block_bh(const at::BFloat16* __restrict__ x, const at::BFloat16* __restrict__ w,
                     const float* bias, int64_t K, O* __restrict__ y, int64_t ldy) {
  constexpr int U = M * R >= BH_CHAINS ? 1 : BH_CHAINS / (M * R);
  __m512 acc[U][M][R];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[u][m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U * BV <= K; k += U * BV) {
    for (int u = 0; u < U; ++u) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load_bh(w + r * K + k + u * BV);
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = load_bh(x + m * K + k + u * BV);
        for (int r = 0; r < R; ++r) acc[u][m][r] = _mm512_dpbf16_ps(acc[u][m][r], xv, wv[r]);
      }
    }
  }
  for (; k < K; k += BV) {
    const int64_t left = K - k;
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = left >= BV ? load_bh(w + r * K + k) : load_bh(w + r * K + k, left);
    }
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = left >= BV ? load_bh(x + m * K + k) : load_bh(x + m * K + k, left);
      for (int r = 0; r < R; ++r) acc[0][m][r] = _mm512_dpbf16_ps(acc[0][m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      __m512 total = acc[0][m][r];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[u][m][r]);
      float s = _mm512_reduce_add_ps(total);
      if (bias != nullptr) s += bias[r];
      y[m * ldy + r] = static_cast<O>(s);
    }
  }
}
#endif

// Up to FEW rows of x, each thread streams its weight rows one at a time (R = 1): a single
// sequential stream per thread, which the hardware prefetchers follow. Interleaving 8 rows (8
// streams 4 KB apart) read 25-35 GB/s on a 2-core EPYC (AVX-512) where one row read 40-63,
// bfloat16 from 27 to 63. With more rows of x the product is bound by arithmetic, not memory:
// chunks of FEW rows of x meet R weight rows at once, so each vector loaded serves several FMAs
// (R = 1 there had made 32 rows 2x slower).
constexpr int FEW = 4;
constexpr int R_MANY = REGISTERS >= 32 ? 4 : 2;
// Weight rows every chunk of x's rows passes over before the next ones (a multiple of R_MANY):
// from the second chunk on they are read from cache, not memory.
constexpr int64_t TILE = 8;

// One M x R block of outputs: block_bh where x is bfloat16 (the weight then is too), else block.
template <typename X, typename T, typename O, int M, int R>
inline void any_block(const X* x, const T* w, const float* bias, int64_t K, O* y, int64_t ldy) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<X, at::BFloat16>) {
    return block_bh<O, M, R>(x, w, bias, K, y, ldy);
  } else
#endif
  {
    return block<T, O, M, R>(x, w, bias, K, y, ldy);
  }
}

template <typename X, typename T, typename O, int M, int R>
void tile(const X* x, const T* w, const float* bias, int64_t K, int64_t n0, int64_t n1, O* y,
          int64_t N) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    any_block<X, T, O, M, R>(x, w + n * K, bias == nullptr ? nullptr : bias + n, K, y + n, N);
  }
  for (; n < n1; ++n) {
    any_block<X, T, O, M, 1>(x, w + n * K, bias == nullptr ? nullptr : bias + n, K, y + n, N);
  }
}

template <typename X, typename T, typename O, int R>
void tile_of(int64_t m, const X* x, const T* w, const float* bias, int64_t K, int64_t n0,
             int64_t n1, O* y, int64_t N) {
  switch (m) {
    case 1: return tile<X, T, O, 1, R>(x, w, bias, K, n0, n1, y, N);
    case 2: return tile<X, T, O, 2, R>(x, w, bias, K, n0, n1, y, N);
    case 3: return tile<X, T, O, 3, R>(x, w, bias, K, n0, n1, y, N);
    default: return tile<X, T, O, 4, R>(x, w, bias, K, n0, n1, y, N);
  }
}

// Weight rows n0..n1 of the product for all M rows of x.
template <typename X, typename T, typename O>
void rows(const X* x, int64_t M, const T* w, const float* bias, int64_t K, int64_t n0,
          int64_t n1, O* y, int64_t N) {
  if (M <= FEW) return tile_of<X, T, O, 1>(M, x, w, bias, K, n0, n1, y, N);
  for (int64_t t = n0; t < n1; t += TILE) {
    const int64_t t1 = std::min(n1, t + TILE);
    for (int64_t m0 = 0; m0 < M; m0 += FEW) {
      const int64_t m = std::min<int64_t>(FEW, M - m0);
      tile_of<X, T, O, R_MANY>(m, x + m0 * K, w, bias, K, t, t1, y + m0 * N, N);
    }
  }
}

// Weight elements below which a thread's share is not worth waking it for (about 256 KB of
// float32: a few microseconds of streaming, about what a wake-up costs).
constexpr int64_t MIN_ELEMENTS_PER_THREAD = 1 << 16;

template <typename X, typename T, typename O>
void run(const X* x, int64_t M, const T* w, const float* bias, int64_t K, int64_t N, O* y) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  const int64_t grain = std::max<int64_t>(1, MIN_ELEMENTS_PER_THREAD / (TILE * K));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    rows<X, T, O>(x, M, w, bias, K, begin * TILE, std::min(N, end * TILE), y, N);
  });
}

template <typename X, typename T>
void with_output(const at::Tensor& xs, const at::Tensor& w, const float* bias, at::Tensor& out) {
  const int64_t M = xs.size(0), K = xs.size(1), N = w.size(0);
  const X* x = xs.data_ptr<X>();
  const T* wp = w.data_ptr<T>();
  switch (out.scalar_type()) {
    case at::kFloat: run<X, T, float>(x, M, wp, bias, K, N, out.data_ptr<float>()); break;
    case at::kBFloat16:
      run<X, T, at::BFloat16>(x, M, wp, bias, K, N, out.data_ptr<at::BFloat16>());
      break;
    default: run<X, T, at::Half>(x, M, wp, bias, K, N, out.data_ptr<at::Half>()); break;
  }
}

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "skinny_linear: x (M, K) and weight (N, K)");
  TORCH_CHECK(weight.is_contiguous(), "skinny_linear: contiguous weight");
  TORCH_CHECK(float_type(x.scalar_type()) && float_type(weight.scalar_type()),
              "skinny_linear: float32, bfloat16 or float16 only");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->device().is_cpu() && float_type(bias->scalar_type()),
                "skinny_linear: bias (N,) contiguous, on CPU, float32/bfloat16/float16");
  }
  // The bias as float32 (N elements: a copy only where it is not float32 already).
  const auto bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (out.numel() == 0) return out;  // no rows (an empty batch) or no outputs
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16) {
    with_output<at::BFloat16, at::BFloat16>(x.contiguous(), weight, b, out);
    return out;
  }
#endif
  const auto x32 = x.to(at::kFloat).contiguous();
  switch (weight.scalar_type()) {
    case at::kFloat: with_output<float, float>(x32, weight, b, out); break;
    case at::kBFloat16: with_output<float, at::BFloat16>(x32, weight, b, out); break;
    default: with_output<float, at::Half>(x32, weight, b, out); break;
  }
  return out;
}

bool skinny_native_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}
