// Vectors of float32 for mgpu's CPU kernels: loads of float32, bfloat16 and float16 into
// float32 registers, and the rounding stores back. GCC vector extensions of the machine's widest
// float register (the kernels are built with -march=native where they run): 16 floats with
// AVX-512, 8 with AVX2. Each function is inline and in an anonymous namespace, so every kernel
// that includes this header gets its own copy.
#pragma once

#include <torch/extension.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;
constexpr int REGISTERS = 32;
#else
constexpr int V = 8;
constexpr int REGISTERS = 16;
#endif

typedef float vf __attribute__((vector_size(V * 4)));
typedef uint16_t vu16 __attribute__((vector_size(V * 2)));
typedef uint32_t vu32 __attribute__((vector_size(V * 4)));

// V consecutive elements at p as float32 (unaligned loads; the conversions stay in registers).
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf load(const at::BFloat16* p) {
  // bfloat16 is float32's top half: widen to 32 bits, shift. One vpmovzxwd from memory (GCC 12
  // splits __builtin_convertvector of 16 lanes into two halves and an insert).
#if defined(__AVX512F__)
  const __m512i bits = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  const __m256i bits = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 bits = __builtin_convertvector(h, vu32) << 16;
#endif
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline vf load(const at::Half* p) {
  // vcvtph2ps: GCC 12 turns __builtin_convertvector of _Float16 vectors into one scalar
  // conversion per element (the float16 kernel read 10 GB/s, against 35-40 for bfloat16).
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < V; ++i) v[i] = static_cast<float>(p[i]);
#endif
  vf out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

// Stores of V float32 lanes at p in the destination's dtype, rounding to nearest even (as c10's
// conversions and PyTorch's vectorised half-precision operators round).
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline void store(at::Half* p, vf v) {
#if defined(__AVX512F__)
  __m512 r;
  std::memcpy(&r, &v, sizeof r);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  __m256 r;
  std::memcpy(&r, &v, sizeof r);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < V; ++i) p[i] = static_cast<at::Half>(v[i]);
#endif
}

// bfloat16 of finite float32 lanes: add half an ulp of bfloat16 (one less where the kept lowest
// bit is 0, so that ties go to even), keep the top 16 bits.
inline vu32 bfloat16_bits(vf v) {
  vu32 u;
  std::memcpy(&u, &v, sizeof u);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

inline void store(at::BFloat16* p, vf v) {
  const vu32 bits = bfloat16_bits(v);
#if defined(__AVX512F__)
  __m512i b;
  std::memcpy(&b, &bits, sizeof b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
#else
  const vu16 h = __builtin_convertvector(bits, vu16);
  std::memcpy(p, &h, sizeof h);
#endif
}

// v rounded to T's precision and back: what a PyTorch operator producing T leaves of it.
template <typename T>
inline vf round_to(vf v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T tmp[V];
    store(tmp, v);
    return load(tmp);
  }
}

}  // namespace
