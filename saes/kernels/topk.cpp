// Exact top-k along the last dimension of a 2-d CPU tensor, for the TopK family's selection (saes/kernels/__init__.py).
// Order: largest first; equal values: the smaller index first; NaN above everything (torch.sort(descending=True,
// stable=True) gives the same order). torch.topk copies every row into (value, index) pairs and partial-sorts them;
// here two passes of strided block maxima (vectorised) find a lower bound of the k-th largest value, and only the
// few elements at or above it are ranked, without branches.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace saewb_topk {

template <typename T>
struct Scratch {
  std::vector<T> block_max, block_sum, cand_value;
  std::vector<int32_t> blocks, cand_index;
  std::vector<T> level2_value;
};

// Candidate arrays carry this many slots past their end, so the counting loop below can read whole vectors.
constexpr int64_t kPad = 8;

// How many of value[0..c) exceed v. value[c..c + kPad) must hold -inf (which exceeds nothing).
template <typename T>
inline int32_t count_greater(const T* value, int64_t c, T v) {
  int32_t count = 0;
  for (int64_t b = 0; b < c; ++b) count += value[b] > v;
  return count;
}

#if defined(__AVX2__)
inline int32_t count_greater(const float* value, int64_t c, float v) {  // 8 comparisons per instruction
  const __m256 pivot = _mm256_set1_ps(v);
  __m256i count = _mm256_setzero_si256();
  for (int64_t b = 0; b < c; b += 8)  // the padding lanes are -inf: never greater
    count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(value + b), pivot, _CMP_GT_OQ)));
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(count), _mm256_extracti128_si256(count, 1));
  sum = _mm_hadd_epi32(sum, sum);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(sum, sum));
}
#endif

// Writes the k best of the c candidates (value, index), best first. Few candidates: each one's rank is counted
// without branches (c² comparisons); many: nth_element then a sort of the k.
// value must have kPad writable slots after c.
template <typename T>
void write_best(T* value, const int32_t* index, int64_t c, int64_t k, const T* row, T* out_v, int64_t* out_i) {
  if (c <= 256) {
    std::fill(value + c, value + c + kPad, -std::numeric_limits<T>::infinity());
    // First by value alone (one comparison per pair). Distinct values get distinct ranks; two equal values in
    // the top k would share one, so a rank written twice means ties, and the exact ranking below runs instead.
    bool taken[256] = {};
    bool collided = false;
    for (int64_t a = 0; a < c; ++a) {
      const int32_t rank = count_greater(value, c, value[a]);
      if (rank < k) {
        collided |= taken[rank];
        taken[rank] = true;
        out_v[rank] = row[index[a]];
        out_i[rank] = index[a];
      }
    }
    if (!collided) return;
    for (int64_t a = 0; a < c; ++a) {
      const T va = value[a];
      const int32_t ia = index[a];
      int32_t rank = 0;
      for (int64_t b = 0; b < c; ++b) rank += (value[b] > va) | ((value[b] == va) & (index[b] < ia));
      if (rank < k) {
        out_v[rank] = row[ia];
        out_i[rank] = ia;
      }
    }
    return;
  }
  std::vector<int64_t> order(c);
  for (int64_t a = 0; a < c; ++a) order[a] = a;
  auto better = [&](int64_t a, int64_t b) {
    return value[a] > value[b] || (value[a] == value[b] && index[a] < index[b]);
  };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
  std::sort(order.begin(), order.begin() + k, better);
  for (int64_t j = 0; j < k; ++j) {
    out_v[j] = row[index[order[j]]];
    out_i[j] = index[order[j]];
  }
}

// Every element is a candidate (small rows, rows with NaN): nth_element and a sort of the k, with NaN above
// everything (as torch.sort), NaNs among themselves and equal values by index.
template <typename T>
void topk_all(const T* s, int64_t n, int64_t k, T* out_v, int64_t* out_i, Scratch<T>& w) {
  w.cand_index.resize(n);
  for (int64_t i = 0; i < n; ++i) w.cand_index[i] = static_cast<int32_t>(i);
  auto better = [s](int32_t a, int32_t b) {
    const bool nan_a = std::isnan(s[a]), nan_b = std::isnan(s[b]);
    if (nan_a || nan_b) return nan_a && (!nan_b || a < b);
    return s[a] > s[b] || (s[a] == s[b] && a < b);
  };
  std::nth_element(w.cand_index.begin(), w.cand_index.begin() + (k - 1), w.cand_index.end(), better);
  std::sort(w.cand_index.begin(), w.cand_index.begin() + k, better);
  for (int64_t j = 0; j < k; ++j) {
    out_v[j] = s[w.cand_index[j]];
    out_i[j] = w.cand_index[j];
  }
}

// Two levels of strided blocks of 8: block j of level 1 holds elements j + t·b1 (t < 8), block j of level 2 the
// level-1 blocks j + t·b2. The k-th largest level-2 maximum is at most the k-th largest element (k distinct blocks
// reach it), so only elements at or above it, in level-1 blocks that reach it, can be among the top k; the k-th
// largest maximum of those level-1 blocks is such a bound too, and tighter.
template <typename T>
void topk_row(const T* s, int64_t n, int64_t k, T* out_v, int64_t* out_i, Scratch<T>& w) {
  constexpr int64_t S = 8;
  const int64_t b1 = n / S, b2 = b1 / S;
  if (b2 < k) return topk_all(s, n, k, out_v, out_i, w);
  w.block_max.resize(b1);
  w.block_sum.resize(b1);
  T* m1 = w.block_max.data();
  T* sum = w.block_sum.data();
  std::copy(s, s + b1, m1);
  std::copy(s, s + b1, sum);
  for (int64_t t = 1; t < S; ++t) {
    const T* stripe = s + t * b1;
    for (int64_t j = 0; j < b1; ++j) {
      m1[j] = stripe[j] > m1[j] ? stripe[j] : m1[j];
      sum[j] += stripe[j];  // NaN anywhere in the block makes its sum NaN
    }
  }
  T partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums, so the reduction vectorises
  int64_t j8 = 0;
  for (; j8 + 8 <= b1; j8 += 8)
    for (int l = 0; l < 8; ++l) partial[l] += sum[j8 + l];
  T total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
            ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  for (; j8 < b1; ++j8) total += sum[j8];
  for (int64_t i = S * b1; i < n; ++i) total += s[i];
  if (std::isnan(total)) return topk_all(s, n, k, out_v, out_i, w);  // NaN (or inf - inf): the exact slow path

  // Level 2: maxima of the level-1 maxima; the last b1 - 8·b2 level-1 blocks stand alone.
  const int64_t n2 = b2 + (b1 - S * b2);
  w.level2_value.resize(n2);
  T* m2 = w.level2_value.data();
  std::copy(m1, m1 + b2, m2);
  for (int64_t t = 1; t < S; ++t) {  // stripe by stripe, like level 1, so it vectorises
    const T* stripe = m1 + t * b2;
    for (int64_t j = 0; j < b2; ++j) m2[j] = stripe[j] > m2[j] ? stripe[j] : m2[j];
  }
  std::copy(m1 + S * b2, m1 + b1, m2 + b2);
  // The k-th largest level-2 maximum (a value: which of several equal maxima it is does not matter).
  std::nth_element(m2, m2 + (k - 1), m2 + n2, std::greater<T>());
  T threshold = m2[k - 1];
  // Level-1 blocks that reach it. Their k-th largest maximum is a tighter bound of the same kind (about 34
  // candidates instead of 74 at n = 2,304, k = 32); keep the blocks that reach that, then their elements that do.
  w.blocks.resize(b1);
  int64_t nb = 0;
  for (int64_t j = 0; j < b1; ++j) {
    w.blocks[nb] = static_cast<int32_t>(j);
    nb += m1[j] >= threshold;
  }
  if (nb > k) {
    w.level2_value.resize(nb);
    for (int64_t q = 0; q < nb; ++q) w.level2_value[q] = m1[w.blocks[q]];
    std::nth_element(w.level2_value.begin(), w.level2_value.begin() + (k - 1), w.level2_value.end(),
                     std::greater<T>());
    threshold = w.level2_value[k - 1];
    int64_t kept = 0;
    for (int64_t q = 0; q < nb; ++q) {
      w.blocks[kept] = w.blocks[q];
      kept += m1[w.blocks[q]] >= threshold;
    }
    nb = kept;
  }
  const int64_t tail = n - S * b1;
  w.cand_value.resize(nb * S + tail + kPad);
  w.cand_index.resize(nb * S + tail);
  T* cv = w.cand_value.data();
  int32_t* ci = w.cand_index.data();
  int64_t c = 0;
  for (int64_t q = 0; q < nb; ++q) {
    const int64_t j = w.blocks[q];
    for (int64_t t = 0; t < S; ++t) {
      const int64_t i = j + t * b1;
      cv[c] = s[i];
      ci[c] = static_cast<int32_t>(i);
      c += s[i] >= threshold;
    }
  }
  for (int64_t i = S * b1; i < n; ++i) {
    cv[c] = s[i];
    ci[c] = static_cast<int32_t>(i);
    c += s[i] >= threshold;
  }
  write_best(cv, ci, c, k, s, out_v, out_i);
}

}  // namespace saewb_topk

std::vector<torch::Tensor> topk_last_dim(const torch::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.device().is_cpu(), "topk_last_dim expects a 2-d CPU tensor");
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "topk_last_dim expects 1 <= k <= the last dimension");
  TORCH_CHECK(scores.size(1) < (int64_t(1) << 31), "topk_last_dim expects fewer than 2^31 columns");
  const auto s = scores.contiguous();
  const int64_t rows = s.size(0), n = s.size(1);
  auto values = torch::empty({rows, k}, s.options());
  auto indices = torch::empty({rows, k}, s.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "topk_last_dim", [&] {
    const scalar_t* src = s.data_ptr<scalar_t>();
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      saewb_topk::Scratch<scalar_t> scratch;
      for (int64_t r = begin; r < end; ++r)
        saewb_topk::topk_row(src + r * n, n, k, out_v + r * k, out_i + r * k, scratch);
    });
  });
  return {values, indices};
}
