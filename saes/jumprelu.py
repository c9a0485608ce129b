"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435), docs/methods.md §3.2.

z_i = u_i * H(u_i - θ_i) with a learned per-latent threshold θ = exp(t) (log-parameterised so it stays > 0,
as SAELens and BatchTopK's repo do). The step has no useful derivative, so θ learns through straight-through
pseudo-derivatives with a rectangle kernel of bandwidth ε; the loss is MSE + λ * L0, where L0 counts H(u - θ)
and its gradient reaches only θ, never the encoder (dictionary_learning, SAELens).
Deviations: the encoder does not subtract b_dec by default (GDM/dictionary_learning; `apply_b_dec_to_input`
switches SAELens's behaviour on); no AuxK (the paper has none). `sparsity_coef` is a plain attribute so the
trainer can warm λ up from 0 (paper: linear warm-up).
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saes import ops
from saes.base import SAE, SAEConfig


def _window(u: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((u - θ)/ε) = 1[|u - θ| < ε/2]. [batch, d_sae]."""
    return ((u - theta).abs() < bandwidth / 2).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z = u * H(u - θ). dz/du = H(u - θ); dz/dθ := -(θ/ε) K((u - θ)/ε), summed over the batch."""

    @staticmethod
    def forward(ctx, u: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(u, theta)
        ctx.bandwidth = bandwidth
        return u * (u > theta)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, theta = ctx.saved_tensors
        grad_u = (u > theta).to(u.dtype) * grad_out
        grad_theta = -(theta / ctx.bandwidth * _window(u, theta, ctx.bandwidth) * grad_out).sum(0)  # [d_sae]
        return grad_u, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(u - θ). dH/du := 0 (the L0 term must not move the encoder); dH/dθ := -(1/ε) K((u - θ)/ε)."""

    @staticmethod
    def forward(ctx, u: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(u, theta)
        ctx.bandwidth = bandwidth
        return (u > theta).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, theta = ctx.saved_tensors
        grad_theta = -(_window(u, theta, ctx.bandwidth) * grad_out).sum(0) / ctx.bandwidth  # [d_sae]
        return None, grad_theta, None


@dataclass
class JumpReLUConfig(SAEConfig):
    threshold_init: float = 0.001
    """Initial θ for every latent (dictionary_learning / paper App. I; SAELens 6 uses 0.01). Activation units."""
    bandwidth: float = 0.001
    """ε of the rectangle kernel, in activation units, so inputs should be normalised (SAELens 6 uses 0.05)."""
    sparsity_coef: float = 1.0
    """λ, weight of the L0 penalty (its value after any warm-up; see `JumpReLUSAE.sparsity_coef`)."""
    target_l0: float | None = None
    """If set, penalise λ (L0/target_l0 - 1)^2 instead of λ L0 (dictionary_learning's target-L0 option)."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec before encoding. GDM and dictionary_learning do not; SAELens makes it configurable."""

    def validate(self) -> None:
        super().validate()
        if not (self.threshold_init > 0 and self.bandwidth > 0):
            raise ValueError(f"threshold_init and bandwidth must be > 0, got threshold_init={self.threshold_init}, "
                             f"bandwidth={self.bandwidth}.")
        if self.sparsity_coef < 0:
            raise ValueError(f"sparsity_coef must be >= 0, got {self.sparsity_coef}.")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be > 0 or None, got {self.target_l0}.")


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    config_cls = JumpReLUConfig
    cfg: JumpReLUConfig
    adam_betas = (0.0, 0.999)  # the paper (App. I) and dictionary_learning: no first-moment momentum

    def __init__(self, cfg: JumpReLUConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        dtype = getattr(torch, cfg.dtype)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.threshold_init), dtype=dtype))
        self.sparsity_coef = cfg.sparsity_coef
        """Current λ; a trainer's warm-up schedule overwrites it each step (e.g. cfg.sparsity_coef * step / n)."""

    @property
    def threshold(self) -> Tensor:
        """θ = exp(t), [d_sae]. Compared with u, which folding the input scale leaves unchanged, so folding
        (`fold_input_scale`) keeps θ as is; folding decoder norms scales it (`fold_decoder_norm`, §D.7)."""
        return self.log_threshold.exp()

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """u = W_enc x + b_enc (GDM), or W_enc (x - b_dec) + b_enc with apply_b_dec_to_input. [batch, d_sae]."""
        x_in = x_scaled - self.b_dec if self.cfg.apply_b_dec_to_input else x_scaled
        return x_in @ self.W_enc.T + self.b_enc

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return JumpReLUFunction.apply(pre_acts, self.threshold, self.cfg.bandwidth)

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        """λ * mean over tokens of the number of active latents, differentiable only through θ."""
        l0 = StepFunction.apply(pre_acts, self.threshold, self.cfg.bandwidth).sum(-1).mean()
        penalty = l0 if self.cfg.target_l0 is None else (l0 / self.cfg.target_l0 - 1) ** 2
        return {"sparsity": self.sparsity_coef * penalty}

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Unit-norm decoder rows with identical outputs: z_i and θ_i scale by ||d_i|| (SAELens fold_W_dec_norm)."""
        norms = ops.fold_decoder_norm(self.W_enc, self.b_enc, self.W_dec)
        self.log_threshold.add_(norms.log())

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach()}  # SAELens name, [d_sae]

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "threshold" not in tensors:
            raise ValueError("JumpReLU checkpoint has no `threshold` tensor: it is not a JumpReLU SAE folder.")
        with torch.no_grad():
            self.log_threshold.copy_(tensors["threshold"].log())

    def saelens_extra_cfg(self) -> dict:
        return {"apply_b_dec_to_input": self.cfg.apply_b_dec_to_input}
