"""ReLU SAE with an L1 penalty weighted by decoder norm (Anthropic "Circuits Updates - April 2024";
dictionary_learning `StandardTrainerAprilUpdate`, SAELens `standard`), docs/methods.md §3.3.

z = relu(W_enc x + b_enc), loss = MSE + λ Σ_i z_i ||d_i||. Weighting by ||d_i|| replaces the unit-norm
constraint: the SAE cannot shrink the penalty by growing d_i and shrinking z_i, so the decoder is left free
(rows start at norm 0.1, tied to the encoder). `fold_decoder_norm` rescales to unit rows for analysis.
Saved under SAELens's name "standard". `sparsity_coef` is a plain attribute so the trainer can warm λ up from 0
(April update: over the first 5% of training).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import ops
from saes.base import SAE, SAEConfig


@dataclass
class ReLUL1Config(SAEConfig):
    l1_coef: float = 5.0
    """λ, weight of Σ z_i ||d_i|| (April update ≈ 5 with inputs scaled to E||x|| = sqrt(d_in); DL default 0.1)."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec before encoding. The April update and dictionary_learning do not; SAELens's default does."""

    def validate(self) -> None:
        super().validate()
        if self.l1_coef < 0:
            raise ValueError(f"l1_coef must be >= 0, got {self.l1_coef}.")


class ReLUL1SAE(SAE):
    architecture = "relu_l1"
    config_cls = ReLUL1Config
    unit_norm_decoder = False
    initial_decoder_norm = 0.1
    cfg: ReLUL1Config

    def __init__(self, cfg: ReLUL1Config, seed: int | None = 0):
        super().__init__(cfg, seed)
        self.sparsity_coef = cfg.l1_coef
        """Current λ; a trainer's warm-up schedule overwrites it each step."""

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """u = W_enc x + b_enc, or W_enc (x - b_dec) + b_enc with apply_b_dec_to_input. [batch, d_sae]."""
        x_in = x_scaled - self.b_dec if self.cfg.apply_b_dec_to_input else x_scaled
        return x_in @ self.W_enc.T + self.b_enc

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return pre_acts.relu()

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        """λ * mean over tokens of Σ_i z_i ||d_i|| (z >= 0, so this is the decoder-weighted L1). No AuxK."""
        weighted = codes * self.W_dec.norm(dim=-1)  # [batch, d_sae]
        return {"sparsity": self.sparsity_coef * weighted.sum(-1).mean()}

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """z_i <- z_i ||d_i||, d_i <- d_i / ||d_i||: same reconstruction and same loss, unit decoder rows."""
        ops.fold_decoder_norm(self.W_enc, self.b_enc, self.W_dec)

    def saelens_extra_cfg(self) -> dict:
        return {"architecture": "standard", "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input}
