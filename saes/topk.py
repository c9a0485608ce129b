"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024, arXiv 2406.04093), algorithms.md §2.

Selection: the k largest pre-activations per token, ReLU'd. Loss: MSE + AuxK/32 on dead latents,
plus the optional Multi-TopK term FVU(4k)/8 (sparsify's `multi_topk`).
"""
from dataclasses import dataclass

from torch import Tensor

from saes import ops
from saes.base import SAE, SAEConfig, check_k


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token."""
    multi_topk: bool = False
    """Add FVU at 4k divided by 8 so the SAE also works at larger k (Gao et al., progressive codes)."""

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae)


class TopKSAE(SAE):
    architecture = "topk"
    config_cls = TopKConfig
    cfg: TopKConfig

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return ops.topk_codes(pre_acts, self.cfg.k)

    def saelens_extra_cfg(self) -> dict:
        """SAELens's TopK reads k from cfg.json (its default, 100, would silently change the codes)."""
        return {"k": self.cfg.k}

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        losses = super().aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask)
        if self.cfg.multi_topk:
            big_k = min(4 * self.cfg.k, self.cfg.d_sae)
            x_hat_big = ops.topk_codes(pre_acts, big_k) @ self.W_dec + self.b_dec
            losses["multi_topk"] = ops.fvu(x_scaled, x_hat_big) / 8
        return losses
