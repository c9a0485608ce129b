// Fused sparse ops of the TopK family's fast training path (saes/sparse_topk.py): the decode with its residual and
// the dot products its backward needs, and the entries sorted by latent (a counting sort).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

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

}  // namespace saewb_sparse

// Per token b with entries e in [offsets[b], offsets[b+1]) (the last token ends at N):
//   residual[b] = target[b] - Σ_e values[e] · weight[indices[e]]          [B, d]
//   dots[e]     = <residual[b], weight[indices[e]]>                     [N]  (the decode backward's value gradient / -2)
//   sq[b]       = ||residual[b]||²                                        [B]
//   centered[b] = ||target[b] - center||² when center is given, else 0    [B]  (FVU's denominator)
// The weight rows a token reads are reused for its dots while they are still in cache.
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
  auto residual = torch::empty({B, d}, w.options());
  auto dots = torch::empty({N}, w.options());
  auto sq = torch::empty({B}, w.options());
  auto centered = torch::zeros({B}, w.options());
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
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> shifted(M ? d : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t first = O[b], last = b + 1 < B ? O[b + 1] : N;
        scalar_t* r = R + b * d;
        const scalar_t* xb = X + b * d;
        for (int64_t i = 0; i < d; ++i) r[i] = xb[i];
        for (int64_t e = first; e < last; ++e) {
          if (e + 2 < last) __builtin_prefetch(W + I[e + 2] * d);
          const scalar_t a = V[e];
          const scalar_t* row = W + I[e] * d;
          for (int64_t i = 0; i < d; ++i) r[i] -= a * row[i];
        }
        S[b] = saewb_sparse::dot(r, r, d);
        for (int64_t e = first; e < last; ++e) D[e] = saewb_sparse::dot(r, W + I[e] * d, d);
        if (M) {
          for (int64_t i = 0; i < d; ++i) shifted[i] = xb[i] - M[i];
          C[b] = saewb_sparse::dot(shifted.data(), shifted.data(), d);
        }
      }
    });
  });
  return {residual, dots, sq, centered};
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
