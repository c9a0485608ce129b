"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024, arXiv 2406.04093), docs/methods.md §2.

Selection: the k largest pre-activations per token, ReLU'd. Loss: MSE + AuxK/32 on dead latents,
plus the optional Multi-TopK term (sparsify's `multi_topk`: FVU + FVU(4k)/8). Our main loss is the squared error
summed over d_in, so the 4k term is that same error at 4k, divided by 8: both share the batch-variance normaliser,
so its weight relative to the main loss is sparsify's whatever the normalisation.
"""
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from saes import ops
from saes import sparse_topk as fast
from saes.base import SAE, SAEConfig, check_k


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token."""
    multi_topk: bool = False
    """Add the reconstruction error at 4k divided by 8 so the SAE also works at larger k (Gao et al.; sparsify)."""
    kernel: str = "sparse"
    """Training path. 'sparse' (default): the fast path of saes/sparse_topk.py, where after the dense encoder matmul
    the encoder backward and the decode touch only the k selected latents (AuxK only the dead ones); 'dense'
    (`--sae-options kernel dense`): the reference path through dense [batch, d_sae] codes. Same selection, values
    and gradients; inference is the same either way."""
    sparse_kernel: bool | None = None
    """Deprecated spelling of `kernel` (true: 'sparse', false: 'dense'); folded into `kernel` when the config is built."""

    def __post_init__(self) -> None:
        self.kernel = fast.check_kernel(self.kernel, self.sparse_kernel)
        self.sparse_kernel = None

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae)
        fast.check_kernel(self.kernel, None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TopKConfig":
        """As SAEConfig's; an old cfg.json's `sparse_kernel: false` was the former default, not a request for the
        dense path, so it is dropped."""
        if data.get("sparse_kernel") is False:
            data = {key: value for key, value in data.items() if key != "sparse_kernel"}
        return super().from_dict(data)  # type: ignore[return-value]


class TopKSAE(SAE):
    architecture = "topk"
    config_cls = TopKConfig
    cfg: TopKConfig

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return ops.topk_codes(pre_acts, self.cfg.k)

    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        return fast.Selection.topk(pre_acts, self.cfg.k)

    def saelens_extra_cfg(self) -> dict:
        """SAELens's TopK reads k from cfg.json (its default, 100, would silently change the codes)."""
        return {"k": self.cfg.k}

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        losses = super().aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask)
        if self.cfg.multi_topk:
            big_k = min(4 * self.cfg.k, self.cfg.d_sae)
            x_hat_big = ops.topk_codes(pre_acts, big_k) @ self.W_dec + self.b_dec
            losses["multi_topk"] = ops.mse_sum(x_scaled, x_hat_big) / 8  # same units as `mse` (§2.2)
        return losses

    def fast_aux_losses(self, pre_acts, x_centered, residual, dead_mask) -> dict[str, Tensor]:
        losses = super().fast_aux_losses(pre_acts, x_centered, residual, dead_mask)
        if self.cfg.multi_topk:
            selection = fast.Selection.topk(pre_acts, min(4 * self.cfg.k, self.cfg.d_sae))
            z = fast.gather_pre_acts(pre_acts, x_centered, self.b_dec, self.W_enc, self.b_enc, selection, relu=True)
            sq_error, _, _ = fast.decode_error(z, self.W_dec, selection, x_centered, self.b_dec)
            losses["multi_topk"] = sq_error / pre_acts.shape[0] / 8  # ops.mse_sum at 4k, same units as `mse`
        return losses
