// Decode attention over the paged KV cache on CPU, reading the blocks where they lie.
//
// The PyTorch path (PagedAttention.gather + two batched matmuls) copies every decoding sequence's
// blocks out of the cache for every layer and then reads the copy again; this kernel follows each
// sequence's block table itself, so each key and value is read once and nothing is written but
// the output. One task per (sequence, KV head): the head's group of query heads share the keys,
// so every key row loaded serves `group` dot products. Scores and the softmax are float32 whatever
// the cache's dtype, as in the PyTorch path.
//
// Shapes (this rank's heads):
//   q             (B, heads, d)                      float32 / bfloat16 / float16, contiguous
//   kv_cache      (2, kv_heads, num_blocks, block_size, d)   the same dtype, contiguous
//   block_tables  (B, max_blocks) int64              padded entries are never read
//   context_lens  (B,) int64                         keys visible to each query: 0..len-1
//   returns       (B, heads, d)                      q's dtype
// window > 0 hides keys older than `window` positions (sliding-window layers); softcap > 0 applies
// softcap * tanh(score / softcap) to the scaled scores (Gemma 2).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline void to_float(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// One (sequence, KV head) task. D > 0 fixes head_dim at compile time (the common widths), so
// the loops over it unroll and the group's accumulators stay in registers; D == 0 reads it from d.
template <typename T, int D>
struct Task {
  const T* cache;
  int64_t d, block_size, head_stride, v_offset, group;
  float scale, softcap;

  int64_t width() const { return D > 0 ? D : d; }

  // Loads one cached row as float32: the row itself for float32 caches, else a converted copy.
  const float* row(const T* src, float* buf) const {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      to_float(src, buf, width());
      return buf;
    }
  }

  // q (group, d) float32, pre-scaled; out (group, d). Keys first..len-1 of this block table.
  void run(const float* __restrict__ q, const int64_t* table, int64_t h, int64_t first,
           int64_t len, std::vector<float>& scores, float* __restrict__ buf,
           float* __restrict__ acc) const {
    const int64_t dd = width(), n = len - first;
    scores.resize(group * n);  // (group, n)
    float* __restrict__ s = scores.data();
    const T* keys = cache + h * head_stride;
    const T* values = cache + v_offset + h * head_stride;
    // Scores, a block at a time: its rows are contiguous (block_size, d) in the cache.
    for (int64_t pos = first; pos < len;) {
      const int64_t block = table[pos / block_size], stop = std::min(len, (pos / block_size + 1) * block_size);
      for (; pos < stop; ++pos) {
        const float* __restrict__ k = row(keys + (block * block_size + pos % block_size) * dd, buf);
        for (int64_t g = 0; g < group; ++g) {
          const float* __restrict__ qg = q + g * dd;
          float dot = 0.f;
          for (int64_t i = 0; i < dd; ++i) dot += qg[i] * k[i];
          s[g * n + pos - first] = dot;
        }
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* __restrict__ sg = s + g * n;
      if (softcap > 0.f) {
        const float inv_cap = 1.f / softcap;
        for (int64_t j = 0; j < n; ++j) sg[j] = softcap * std::tanh(sg[j] * inv_cap);
      }
      float top = sg[0];
      for (int64_t j = 1; j < n; ++j) top = std::max(top, sg[j]);
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        sg[j] = std::exp(sg[j] - top);
        total += sg[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
    }
    std::fill(acc, acc + group * dd, 0.f);
    for (int64_t pos = first; pos < len;) {
      const int64_t block = table[pos / block_size], stop = std::min(len, (pos / block_size + 1) * block_size);
      for (; pos < stop; ++pos) {
        const float* __restrict__ v = row(values + (block * block_size + pos % block_size) * dd, buf);
        for (int64_t g = 0; g < group; ++g) {
          const float p = s[g * n + pos - first];
          float* __restrict__ ag = acc + g * dd;
          for (int64_t i = 0; i < dd; ++i) ag[i] += p * v[i];
        }
      }
    }
  }
};

template <typename T, int D>
void decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, at::Tensor& out, double scale, double softcap,
            int64_t window) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2);
  const int64_t block_size = kv_cache.size(3), max_blocks = block_tables.size(1);
  const int64_t group = heads / kv_heads;
  const T* q_ptr = q.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t head_stride = num_blocks * block_size * d;  // one KV head's blocks
  const Task<T, D> task{kv_cache.data_ptr<T>(), d, block_size, head_stride, kv_heads * head_stride,
                        group, static_cast<float>(scale), static_cast<float>(softcap)};

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), buf(d), acc(group * d), scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kv_heads, h = i % kv_heads, len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      to_float(q_ptr + (b * heads + h * group) * d, qf.data(), group * d);  // (group, d)
      for (auto& x : qf) x *= task.scale;
      task.run(qf.data(), tables + b * max_blocks, h, first, len, scores, buf.data(), acc.data());
      T* o = out_ptr + (b * heads + h * group) * d;
      for (int64_t j = 0; j < group * d; ++j) o[j] = static_cast<T>(acc[j]);
    }
  });
}

template <typename T>
void dispatch(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
              const at::Tensor& context_lens, at::Tensor& out, double scale, double softcap,
              int64_t window) {
  switch (q.size(2)) {
    case 64:
      return decode<T, 64>(q, kv_cache, block_tables, context_lens, out, scale, softcap, window);
    case 128:
      return decode<T, 128>(q, kv_cache, block_tables, context_lens, out, scale, softcap, window);
    default:
      return decode<T, 0>(q, kv_cache, block_tables, context_lens, out, scale, softcap, window);
  }
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale, double softcap, int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_decode: CPU tensors");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "paged_decode: q (B, heads, d) and kv_cache (2, kv_heads, blocks, block_size, d)");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous(), "paged_decode: contiguous inputs");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "paged_decode: q and cache dtypes differ");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(1) % kv_cache.size(1) == 0,
              "paged_decode: head_dim or head grouping mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode: int64 block tables and context lengths");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "paged_decode: one block table and context length per sequence");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch<float>(q, kv_cache, tables, lens, out, scale, softcap, window);
      break;
    case at::kBFloat16:
      dispatch<at::BFloat16>(q, kv_cache, tables, lens, out, scale, softcap, window);
      break;
    case at::kHalf:
      dispatch<at::Half>(q, kv_cache, tables, lens, out, scale, softcap, window);
      break;
    default:
      TORCH_CHECK(false, "paged_decode: float32, bfloat16 or float16 only");
  }
  return out;
}
