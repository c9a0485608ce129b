// Python bindings of the compiled kernels (saes/kernels/__init__.py loads them as one extension).
#include <torch/extension.h>
#include <vector>

std::vector<torch::Tensor> topk_last_dim(const torch::Tensor& scores, int64_t k);
std::vector<torch::Tensor> decode_residual(const torch::Tensor& values, const torch::Tensor& weight,
                                           const torch::Tensor& indices, const torch::Tensor& offsets,
                                           const torch::Tensor& target, const c10::optional<torch::Tensor>& center);
std::vector<torch::Tensor> latent_plan(const torch::Tensor& latents, int64_t n);
torch::Tensor latent_sum(const torch::Tensor& rows, const torch::Tensor& tokens, const torch::Tensor& offsets,
                         const torch::Tensor& weights, int64_t row_block_bytes);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_last_dim", &topk_last_dim, "(values, indices) of the k largest along the last dimension, largest first");
  m.def("decode_residual", &decode_residual,
        "(residual, dots, sq, centered, colsum) of the sparse decode against a target",
        pybind11::arg("values"), pybind11::arg("weight"), pybind11::arg("indices"), pybind11::arg("offsets"),
        pybind11::arg("target"), pybind11::arg("center") = pybind11::none());
  m.def("latent_plan", &latent_plan, "(order, offsets) of entries sorted stably by latent (counting sort)");
  m.def("latent_sum", &latent_sum,
        "[n, d] sums of weighted token rows per latent, threads split by entries, rows read in cache-sized blocks "
        "(row_block_bytes <= 0: 4 MiB; tests pass smaller ones)",
        pybind11::arg("rows"), pybind11::arg("tokens"), pybind11::arg("offsets"), pybind11::arg("weights"),
        pybind11::arg("row_block_bytes") = 0);
}
