"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders",
arXiv 2404.16014), inference only: it exists so gated SAEs from SAELens and dictionary_learning load and analyse
here; training one is not supported (`trainable = False`).

A gate decides which latents fire and a magnitude path, sharing W_enc up to a per-latent rescale exp(r_mag),
decides how much:  x' = s*x - b_dec,  z = 1[W_enc x' + b_gate > 0] * relu((exp(r_mag) ⊙ W_enc) x' + b_mag).
`b_enc` is the gate bias; `r_mag` and `b_mag` are saved beside the four SAELens tensors under those names.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saes.base import SAE, SAEConfig


@dataclass
class GatedConfig(SAEConfig):
    pass


class GatedSAE(SAE):
    architecture = "gated"
    config_cls = GatedConfig
    trainable = False
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        dtype = self.W_enc.dtype
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        """pre_acts is the gate's pre-activation; the magnitude path is computed here. [batch, d_sae]."""
        magnitude = (x_scaled - self.b_dec) @ (self.W_enc * self.r_mag.exp()[:, None]).T + self.b_mag
        return (pre_acts > 0) * magnitude.relu()

    @torch.no_grad()
    def fold_b_dec_into_encoder(self) -> None:
        """Both paths read x - b_dec, so both biases absorb it (see SAE.fold_b_dec_into_encoder)."""
        shift = (self.W_enc.double() * self.r_mag.double().exp()[:, None]) @ self.b_dec.double()
        self.b_mag.copy_((self.b_mag.double() + shift).to(self.b_mag.dtype))
        super().fold_b_dec_into_encoder()

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"r_mag": self.r_mag.detach(), "b_mag": self.b_mag.detach()}

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        missing = {"r_mag", "b_mag"} - set(tensors)
        if missing:
            raise ValueError(f"A gated SAE needs the tensors r_mag and b_mag; this file lacks {sorted(missing)}.")
        with torch.no_grad():
            self.r_mag.copy_(tensors["r_mag"])
            self.b_mag.copy_(tensors["b_mag"])

    def saelens_extra_cfg(self) -> dict:
        return {}
