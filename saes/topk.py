"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024, arXiv 2406.04093), docs/methods.md §2.

Selection: the k largest pre-activations per token, ReLU'd. Loss: MSE + AuxK/32 on dead latents,
plus the optional Multi-TopK term (sparsify's `multi_topk`: FVU + FVU(4k)/8). Our main loss is the squared error
summed over d_in, so the 4k term is that same error at 4k, divided by 8: both share the batch-variance normaliser,
so its weight relative to the main loss is sparsify's whatever the normalisation.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import ops
from saes.base import SAE, SAEConfig, SAEOutput, check_k
from saes.sparse_topk import dead_pre_acts, sparse_topk_forward


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token."""
    multi_topk: bool = False
    """Add the reconstruction error at 4k divided by 8 so the SAE also works at larger k (Gao et al.; sparsify)."""
    sparse_kernel: bool = False
    """Train with the sparse path of saes/sparse_topk.py (same math, work after the encoder scales with k)."""

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae)
        if self.sparse_kernel and self.multi_topk:
            raise ValueError("sparse_kernel does not support multi_topk: turn one of them off.")


class TopKSAE(SAE):
    architecture = "topk"
    config_cls = TopKConfig
    cfg: TopKConfig

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return ops.topk_codes(pre_acts, self.cfg.k)

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        if not (self.cfg.sparse_kernel and torch.is_grad_enabled()) or type(self).select is not TopKSAE.select:
            return super().forward(x, dead_mask=dead_mask, grad=grad)
        self._check_input(x)
        self._check_trainable()
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        x_centered = x_scaled - self.b_dec
        values, indices, pre_acts, decoded = sparse_topk_forward(x_centered, self.W_enc, self.b_enc, self.W_dec,
                                                                 self.cfg.k)
        x_hat_scaled = decoded + self.b_dec
        codes = torch.zeros_like(pre_acts).scatter(-1, indices, values.detach())  # [batch, d_sae]
        losses = {"mse": ops.mse_sum(x_scaled, x_hat_scaled)}
        if dead_mask is not None and bool(dead_mask.any()) and self.cfg.effective_aux_k:
            aux_pre = dead_pre_acts(pre_acts, x_centered, self.W_enc, self.b_enc, dead_mask)
            losses.update(super().aux_losses(aux_pre, codes, x_scaled, x_hat_scaled, dead_mask))
        metrics = {"fvu": ops.fvu(x_scaled, x_hat_scaled).detach(), "l0": (values > 0).sum(-1).float().mean()}
        return SAEOutput(x_hat_scaled / self.input_scale, codes, pre_acts, losses, metrics)

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
