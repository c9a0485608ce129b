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
#include <limits>
#include <vector>

namespace saewb_topk {

template <typename T>
struct Scratch {
  std::vector<T> block_max, block_sum, cand_value;
  std::vector<int32_t> blocks, cand_index;
  std::vector<T> level2_value;
  std::vector<int64_t> level2_index;
};

template <typename T>
inline T rank_key(T v) { return std::isnan(v) ? std::numeric_limits<T>::infinity() : v; }

// Writes the k best of the c candidates (value, index), best first. Few candidates: each one's rank is counted
// without branches (c² comparisons); many: nth_element then a sort of the k.
template <typename T>
void write_best(const T* value, const int32_t* index, int64_t c, int64_t k, const T* row, T* out_v, int64_t* out_i) {
  if (c <= 256) {
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

// Every element is a candidate (small rows, rows with NaN).
template <typename T>
void topk_all(const T* s, int64_t n, int64_t k, T* out_v, int64_t* out_i, Scratch<T>& w) {
  w.cand_value.resize(n);
  w.cand_index.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    w.cand_value[i] = rank_key(s[i]);
    w.cand_index[i] = static_cast<int32_t>(i);
  }
  write_best(w.cand_value.data(), w.cand_index.data(), n, k, s, out_v, out_i);
}

// Two levels of strided blocks of 8: block j of level 1 holds elements j + t·b1 (t < 8), block j of level 2 the
// level-1 blocks j + t·b2. The k-th largest level-2 maximum is at most the k-th largest element (k distinct blocks
// reach it), so only elements at or above it, in level-1 blocks that reach it, can be among the top k.
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
  T total = 0;
  for (int64_t j = 0; j < b1; ++j) total += sum[j];
  for (int64_t i = S * b1; i < n; ++i) total += s[i];
  if (std::isnan(total)) return topk_all(s, n, k, out_v, out_i, w);  // NaN (or inf - inf): the exact slow path

  // Level 2: maxima of the level-1 maxima; the last b1 - 8·b2 level-1 blocks stand alone.
  const int64_t n2 = b2 + (b1 - S * b2);
  w.cand_value.resize(std::max<int64_t>(n2, 64));
  w.cand_index.resize(std::max<int64_t>(n2, 64));
  T* m2 = w.cand_value.data();
  int32_t* j2 = w.cand_index.data();
  for (int64_t j = 0; j < b2; ++j) {
    T m = m1[j];
    for (int64_t t = 1; t < S; ++t) m = m1[j + t * b2] > m ? m1[j + t * b2] : m;
    m2[j] = m;
    j2[j] = static_cast<int32_t>(j);
  }
  for (int64_t j = S * b2, q = b2; j < b1; ++j, ++q) {
    m2[q] = m1[j];
    j2[q] = static_cast<int32_t>(q);
  }
  // The k-th best level-2 maximum, by the same ranking as the elements.
  w.level2_value.resize(k);
  w.level2_index.resize(k);
  write_best(m2, j2, n2, k, m2, w.level2_value.data(), w.level2_index.data());
  const T threshold = w.level2_value[k - 1];
  // Level-1 blocks that reach the threshold, then their elements that do.
  w.blocks.resize(b1);
  int64_t nb = 0;
  for (int64_t j = 0; j < b1; ++j) {
    w.blocks[nb] = static_cast<int32_t>(j);
    nb += m1[j] >= threshold;
  }
  const int64_t tail = n - S * b1;
  w.cand_value.resize(nb * S + tail);
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
