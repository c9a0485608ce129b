// Fused sparse ops of the TopK family's fast training path (saes/sparse_topk.py): the decode with its residual and
// the dot products its backward needs, the entries sorted by latent (a counting sort), and the per-latent sums of
// the backward with the latents split between threads by their entries.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SAEWB_AVX2 1
#endif
#if defined(SAEWB_AVX2) && defined(__AVX512F__)
#define SAEWB_AVX512 1  // built with -mavx512f where torch reports AVX512 (saes/kernels/__init__.py)
#endif

namespace saewb_sparse {

// <a, b> over d elements with 8 independent partial sums (vectorised without reassociating flags).
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// One token, any type and width: r = x - Σ_e V[e] rows[e] (also added to colsum), then ||r||² and the dots
// <r, rows[e]>.
template <typename T>
void decode_token(const T* x, const T* const* rows, const T* V, int64_t count, int64_t d, T* r, T* sq, T* dots,
                  T* colsum) {
  for (int64_t i = 0; i < d; ++i) r[i] = x[i];
  for (int64_t e = 0; e < count; ++e) {
    if (e + 2 < count) __builtin_prefetch(rows[e + 2]);
    const T a = V[e];
    for (int64_t i = 0; i < d; ++i) r[i] -= a * rows[e][i];
  }
  for (int64_t i = 0; i < d; ++i) colsum[i] += r[i];
  *sq = dot(r, r, d);
  for (int64_t e = 0; e < count; ++e) dots[e] = dot(r, rows[e], d);
}

#ifdef SAEWB_AVX2
inline float hsum(__m256 v) {  // ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)), the order of dot() above
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_hadd_ps(a, a);
  return _mm_cvtss_f32(_mm_hadd_ps(a, a));
}

// NV (<= 8) vectors of r from column c: held in registers while every row of the token is added, so r is written
// once instead of read and written per row.
template <int NV>
inline void decode_chunk(const float* x, const float* const* rows, const float* V, int64_t count, int64_t c, float* r,
                         float* colsum, __m256& sq) {
  __m256 acc[NV];
  for (int l = 0; l < NV; ++l) acc[l] = _mm256_loadu_ps(x + c + 8 * l);
  for (int64_t e = 0; e < count; ++e) {
    const __m256 a = _mm256_set1_ps(-V[e]);
    const float* row = rows[e] + c;
    for (int l = 0; l < NV; ++l) acc[l] = _mm256_fmadd_ps(a, _mm256_loadu_ps(row + 8 * l), acc[l]);
  }
  for (int l = 0; l < NV; ++l) {
    _mm256_storeu_ps(r + c + 8 * l, acc[l]);
    _mm256_storeu_ps(colsum + c + 8 * l, _mm256_add_ps(_mm256_loadu_ps(colsum + c + 8 * l), acc[l]));
    sq = _mm256_fmadd_ps(acc[l], acc[l], sq);
  }
}

#endif

// The register-blocked decode_token where it applies (returns false elsewhere: decode_token then runs).
template <typename T>
inline bool decode_token_blocked(const T*, const T* const*, const T*, int64_t, int64_t, T*, T*, T*, T*) {
  return false;
}

#ifdef SAEWB_AVX2
// float32 with d a multiple of 8: the same arithmetic as decode_token, register-blocked.
template <>
inline bool decode_token_blocked<float>(const float* x, const float* const* rows, const float* V, int64_t count,
                                        int64_t d, float* r, float* sq, float* dots, float* colsum) {
  if (d % 8 != 0) return false;
  __m256 sq_acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) decode_chunk<8>(x, rows, V, count, c, r, colsum, sq_acc);
  switch ((d - c) / 8) {
    case 7: decode_chunk<7>(x, rows, V, count, c, r, colsum, sq_acc); break;
    case 6: decode_chunk<6>(x, rows, V, count, c, r, colsum, sq_acc); break;
    case 5: decode_chunk<5>(x, rows, V, count, c, r, colsum, sq_acc); break;
    case 4: decode_chunk<4>(x, rows, V, count, c, r, colsum, sq_acc); break;
    case 3: decode_chunk<3>(x, rows, V, count, c, r, colsum, sq_acc); break;
    case 2: decode_chunk<2>(x, rows, V, count, c, r, colsum, sq_acc); break;
    case 1: decode_chunk<1>(x, rows, V, count, c, r, colsum, sq_acc); break;
    default: break;
  }
  *sq = hsum(sq_acc);
  int64_t e = 0;
  for (; e + 4 <= count; e += 4) {  // four rows against r per pass
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 rv = _mm256_loadu_ps(r + i);
      a0 = _mm256_fmadd_ps(rv, _mm256_loadu_ps(rows[e] + i), a0);
      a1 = _mm256_fmadd_ps(rv, _mm256_loadu_ps(rows[e + 1] + i), a1);
      a2 = _mm256_fmadd_ps(rv, _mm256_loadu_ps(rows[e + 2] + i), a2);
      a3 = _mm256_fmadd_ps(rv, _mm256_loadu_ps(rows[e + 3] + i), a3);
    }
    dots[e] = hsum(a0), dots[e + 1] = hsum(a1), dots[e + 2] = hsum(a2), dots[e + 3] = hsum(a3);
  }
  for (; e < count; ++e) {
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(rows[e] + i), a0);
    dots[e] = hsum(a0);
  }
  return true;
}
#endif

// One latent, any type and width: out = Σ_e w[e] · X[tok[e]] (entries in plan order).
template <typename T>
void latent_row(const T* X, const int64_t* tok, const T* w, int64_t count, int64_t d, T* out, bool accumulate) {
  if (!accumulate)
    for (int64_t i = 0; i < d; ++i) out[i] = 0;
  for (int64_t e = 0; e < count; ++e) {
    const T a = w[e];
    const T* row = X + tok[e] * d;
    for (int64_t i = 0; i < d; ++i) out[i] += a * row[i];
  }
}

// The register-blocked latent_row where it applies (float32, d a multiple of 8); false elsewhere.
template <typename T>
inline bool latent_row_blocked(const T*, const int64_t*, const T*, int64_t, int64_t, T*, bool) {
  return false;
}

#ifdef SAEWB_AVX2
// The float vectors latent_chunk runs on: 8 floats (AVX2) or, where built with -mavx512f, 16.
struct Floats8 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V broadcast(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
#ifdef SAEWB_AVX512
struct Floats16 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V broadcast(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
#endif

// NV vectors of one latent's sum from column c, held in registers over all its entries. Each column adds its
// entries in order with one fused multiply-add each, so any vector width gives bit-identical sums.
template <typename F, int NV>
inline void latent_chunk(const float* X, const int64_t* tok, const float* w, int64_t count, int64_t d, int64_t c,
                         float* out, bool accumulate) {
  typename F::V acc[NV];
  for (int l = 0; l < NV; ++l) acc[l] = accumulate ? F::load(out + c + F::kWidth * l) : F::zero();
  for (int64_t e = 0; e < count; ++e) {
    const auto a = F::broadcast(w[e]);
    const float* row = X + tok[e] * d + c;
    for (int l = 0; l < NV; ++l) acc[l] = F::fmadd(a, F::load(row + F::kWidth * l), acc[l]);
  }
  for (int l = 0; l < NV; ++l) F::store(out + c + F::kWidth * l, acc[l]);
}

// Passes of 12 vectors (96 columns; 12 accumulators leave registers for the broadcast and a load), then of 4, then 1;
// with AVX-512 first passes of 24, 8 and 4 16-float vectors (d = 576: three passes instead of six).
template <>
inline bool latent_row_blocked<float>(const float* X, const int64_t* tok, const float* w, int64_t count, int64_t d,
                                      float* out, bool accumulate) {
  if (d % 8 != 0) return false;
  int64_t c = 0;
#ifdef SAEWB_AVX512  // up to 24 accumulators of 32 registers
  for (; c + 384 <= d; c += 384) latent_chunk<Floats16, 24>(X, tok, w, count, d, c, out, accumulate);
  for (; c + 128 <= d; c += 128) latent_chunk<Floats16, 8>(X, tok, w, count, d, c, out, accumulate);
  for (; c + 64 <= d; c += 64) latent_chunk<Floats16, 4>(X, tok, w, count, d, c, out, accumulate);
#endif
  for (; c + 96 <= d; c += 96) latent_chunk<Floats8, 12>(X, tok, w, count, d, c, out, accumulate);
  for (; c + 32 <= d; c += 32) latent_chunk<Floats8, 4>(X, tok, w, count, d, c, out, accumulate);
  for (; c < d; c += 8) latent_chunk<Floats8, 1>(X, tok, w, count, d, c, out, accumulate);
  return true;
}
#endif

}  // namespace saewb_sparse

// Per token b with entries e in [offsets[b], offsets[b+1]) (the last token ends at N):
//   residual[b] = target[b] - Σ_e values[e] · weight[indices[e]]          [B, d]
//   dots[e]     = <residual[b], weight[indices[e]]>                     [N]  (value gradient / -2 in the backward)
//   sq[b]       = ||residual[b]||²                                        [B]
//   centered[b] = ||target[b] - center||² when center is given, else 0    [B]  (FVU's denominator)
//   colsum      = Σ_b residual[b]                                         [d]  (b_dec's gradient / -2)
// The weight rows a token reads are reused for its dots while they are still in cache; float32 rows whose width is a
// multiple of 8 take the register-blocked AVX2 loop (when built with AVX2 and FMA), the rest the plain loop. colsum
// adds per block of kBlock tokens, then across blocks: the same sum for any number of threads.
constexpr int64_t kBlock = 64;

std::vector<torch::Tensor> decode_residual(const torch::Tensor& values, const torch::Tensor& weight,
                                           const torch::Tensor& indices, const torch::Tensor& offsets,
                                           const torch::Tensor& target, const c10::optional<torch::Tensor>& center) {
  TORCH_CHECK(weight.dim() == 2 && target.dim() == 2 && weight.size(1) == target.size(1),
              "decode_residual expects weight [n, d] and target [B, d]");
  TORCH_CHECK(values.numel() == indices.numel() && offsets.numel() == target.size(0),
              "decode_residual expects one value per index and one offset per token");
  const auto w = weight.contiguous();
  const auto x = target.to(w.scalar_type()).contiguous();
  const auto v = values.to(w.scalar_type()).contiguous().reshape(-1);
  const auto ix = indices.to(torch::kLong).contiguous().reshape(-1);
  const auto off = offsets.to(torch::kLong).contiguous();
  const int64_t B = x.size(0), d = w.size(1), N = ix.numel();
  const int64_t blocks = (B + kBlock - 1) / kBlock;
  auto residual = torch::empty({B, d}, w.options());
  auto dots = torch::empty({N}, w.options());
  auto sq = torch::empty({B}, w.options());
  auto centered = torch::zeros({B}, w.options());
  auto block_sums = torch::zeros({blocks, d}, w.options());
  torch::Tensor mu;
  if (center.has_value()) mu = center->to(w.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "decode_residual", [&] {
    const scalar_t* W = w.data_ptr<scalar_t>();
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* V = v.data_ptr<scalar_t>();
    const int64_t* I = ix.data_ptr<int64_t>();
    const int64_t* O = off.data_ptr<int64_t>();
    const scalar_t* M = mu.defined() ? mu.data_ptr<scalar_t>() : nullptr;
    scalar_t* R = residual.data_ptr<scalar_t>();
    scalar_t* D = dots.data_ptr<scalar_t>();
    scalar_t* S = sq.data_ptr<scalar_t>();
    scalar_t* C = centered.data_ptr<scalar_t>();
    scalar_t* G = block_sums.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<scalar_t> shifted(M ? d : 0);
      std::vector<const scalar_t*> rows;
      for (int64_t k = k0; k < k1; ++k) {
        scalar_t* colsum = G + k * d;
        for (int64_t b = k * kBlock; b < std::min(B, (k + 1) * kBlock); ++b) {
          const int64_t first = O[b], count = (b + 1 < B ? O[b + 1] : N) - first;
          rows.resize(count);
          for (int64_t e = 0; e < count; ++e) rows[e] = W + I[first + e] * d;
          const scalar_t* xb = X + b * d;
          if (!saewb_sparse::decode_token_blocked(xb, rows.data(), V + first, count, d, R + b * d, S + b, D + first,
                                                  colsum))
            saewb_sparse::decode_token(xb, rows.data(), V + first, count, d, R + b * d, S + b, D + first, colsum);
          if (M) {
            for (int64_t i = 0; i < d; ++i) shifted[i] = xb[i] - M[i];
            C[b] = saewb_sparse::dot(shifted.data(), shifted.data(), d);
          }
        }
      }
    });
  });
  return {residual, dots, sq, centered, block_sums.sum(0)};
}

// Entries sorted by latent, stably (a counting sort): order [N] (entry positions, latent-major; within a latent in
// entry order) and offsets [n] (first sorted position of each latent; an empty latent repeats the next start).
std::vector<torch::Tensor> latent_plan(const torch::Tensor& latents, int64_t n) {
  const auto keys = latents.to(torch::kLong).contiguous().reshape(-1);
  const int64_t N = keys.numel();
  auto order = torch::empty({N}, keys.options());
  auto offsets = torch::empty({n}, keys.options());
  const int64_t* K = keys.data_ptr<int64_t>();
  int64_t* P = order.data_ptr<int64_t>();
  int64_t* F = offsets.data_ptr<int64_t>();
  std::vector<int64_t> count(n + 1, 0);
  for (int64_t e = 0; e < N; ++e) {
    TORCH_CHECK(K[e] >= 0 && K[e] < n, "latent_plan: latent index ", K[e], " is outside [0, ", n, ")");
    ++count[K[e] + 1];
  }
  for (int64_t j = 0; j < n; ++j) count[j + 1] += count[j];
  for (int64_t j = 0; j < n; ++j) F[j] = count[j];
  for (int64_t e = 0; e < N; ++e) P[count[K[e]]++] = e;
  return {order, offsets};
}

// Per latent j with sorted entries e in [offsets[j], offsets[j+1]) (the last latent ends at N):
//   out[j] = Σ_e weights[e] · rows[tokens[e]]                               [n, d]   (zero for a latent with none)
// the gradient of W_enc or W_dec. Each latent is summed by one thread in entry order, so the result does not depend
// on the thread count (nor on the token blocks below).
// * Threads take contiguous latent ranges holding equal shares of the entries. Latent frequencies are heavy-tailed
//   (in a trained SAE a few latents fire on many tokens); an equal share of latents per thread, as embedding_bag
//   splits them, left one of two threads with 77 % of the work on the planted-dictionary benchmark.
// * Each thread walks the rows in blocks of row_block_bytes (<= 0: kRowBlockBytes): per block, every latent adds its
//   next entries whose tokens lie below the block's end. With each latent's tokens ascending (as latent_plan orders
//   them), a block's rows stay in the last-level cache while all its latents read them (each row is read by about k
//   latents) instead of coming from DRAM for every latent. In any other order the sum is the same (entries are still
//   taken in order, and the last block takes the rest), only slower. (Blocks of half the L3, one pass over the
//   benchmark's 9.4 MiB of rows on a 32 MiB L3, measured 0.94x-1.18x against 4 MiB over six runs of
//   bench/cpu_kernels.py, which compared the two on 3 Dec 2026: no gain, so the block stays fixed.)
constexpr int64_t kRowBlockBytes = 4 << 20;

torch::Tensor latent_sum(const torch::Tensor& rows, const torch::Tensor& tokens, const torch::Tensor& offsets,
                         const torch::Tensor& weights, int64_t row_block_bytes) {
  TORCH_CHECK(rows.dim() == 2 && tokens.numel() == weights.numel(),
              "latent_sum expects rows [B, d] and one weight per token entry");
  const auto X = rows.contiguous();
  const auto tok = tokens.to(torch::kLong).contiguous().reshape(-1);
  const auto off = offsets.to(torch::kLong).contiguous().reshape(-1);
  const auto w = weights.to(X.scalar_type()).contiguous().reshape(-1);
  const int64_t n = off.numel(), d = X.size(1), N = tok.numel(), B = X.size(0);
  auto out = torch::empty({n, d}, X.options());
  if (n == 0 || d == 0) return out;
  const int64_t* T = tok.data_ptr<int64_t>();
  const int64_t* O = off.data_ptr<int64_t>();
  bool ascending = O[0] == 0 && O[n - 1] <= N;
  for (int64_t j = 0; j + 1 < n; ++j) ascending = ascending && O[j] <= O[j + 1];
  TORCH_CHECK(ascending, "latent_sum: offsets must start at 0, never decrease and stay within the entries");
  for (int64_t e = 0; e < N; ++e)
    TORCH_CHECK(T[e] >= 0 && T[e] < B, "latent_sum: token index ", T[e], " is outside [0, ", B, ")");
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> starts(threads + 1, n);  // latent ranges at equal shares of the N entries
  for (int64_t t = 0; t < threads; ++t)
    starts[t] = std::lower_bound(O, O + n, (N * t) / threads) - O;
  starts[0] = 0;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "latent_sum", [&] {
    const scalar_t* R = X.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    const int64_t row_bytes = d * (int64_t)sizeof(scalar_t);
    const int64_t block_bytes = row_block_bytes > 0 ? row_block_bytes : kRowBlockBytes;
    const int64_t block = std::max<int64_t>(1, block_bytes / std::max<int64_t>(1, row_bytes));
    const int64_t blocks = std::max<int64_t>(1, (B + block - 1) / block);
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const int64_t j0 = starts[t0], j1 = starts[t1];
      std::vector<int64_t> cursor(O + j0, O + j1);
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t end_token = std::min(B, (k + 1) * block);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t first = cursor[j - j0], bag_end = j + 1 < n ? O[j + 1] : N;
          int64_t last = first;
          while (last < bag_end && T[last] < end_token) ++last;
          cursor[j - j0] = last;
          if (k > 0 && last == first) continue;
          if (!saewb_sparse::latent_row_blocked(R, T + first, W + first, last - first, d, Y + j * d, k > 0))
            saewb_sparse::latent_row(R, T + first, W + first, last - first, d, Y + j * d, k > 0);
        }
      }
    });
  });
  return out;
}
