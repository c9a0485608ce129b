"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410), algorithms.md §3.1.

Training keeps the k*batch largest activations of the whole batch, so the mean L0 is exactly k while each token
gets as many latents as it needs. That rule depends on the other tokens, so inference uses a single threshold θ
instead (z = u * [u > θ], JumpReLU with one θ for every latent), estimated during training as an EMA of the
smallest activation the batch kept (dictionary_learning's rule and defaults: decay 0.999, start after step 1000;
SAELens updates from step 0 with rate 0.01). `to_jumprelu()` turns the SAE into the equivalent SAELens "jumprelu".
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import ops
from saes.base import SAE, SAEConfig, check_k
from saes.jumprelu import JumpReLUConfig, JumpReLUSAE


@dataclass
class BatchTopKConfig(SAEConfig):
    k: int = 32
    """Mean active latents per token: a training batch keeps its k*batch largest activations."""
    threshold_decay: float = 0.999
    """EMA decay of the inference threshold θ (dictionary_learning; SAELens's rate 0.01 is decay 0.99)."""
    threshold_start_step: int = 1000
    """Optimiser steps before θ is estimated: early batches, before the encoder settles, would bias it."""

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae)
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {self.threshold_decay}.")
        if self.threshold_start_step < 0:
            raise ValueError(f"threshold_start_step must be >= 0, got {self.threshold_start_step}.")


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    config_cls = BatchTopKConfig
    batch_dependent = True
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        # θ in the pre-activation space (unchanged by folding the input scale); < 0 means "not estimated yet",
        # and inference then keeps every positive pre-activation (plain ReLU).
        self.register_buffer("threshold", torch.tensor(-1.0))
        # Optimiser steps seen by `after_step`; a buffer so that a trainer's state_dict resume is exact.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._batch_min: Tensor | None = None  # this batch's smallest kept activation, consumed by after_step

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        if train:
            codes = ops.batch_topk_codes(pre_acts, self.cfg.k)  # [batch, d_sae]
            self._batch_min = ops.min_kept(codes)
            return codes
        return pre_acts * (pre_acts > self.threshold.clamp_min(0.0))  # per token: never batch-dependent

    def after_step(self) -> None:
        """Renormalise the decoder, then fold this batch's smallest kept activation into the EMA of θ."""
        super().after_step()
        self.steps.add_(1)
        if self._batch_min is not None and int(self.steps) > self.cfg.threshold_start_step:
            observed = self._batch_min.to(self.threshold.dtype)
            decay = self.cfg.threshold_decay
            self.threshold.copy_(observed if self.threshold < 0 else decay * self.threshold + (1 - decay) * observed)
        self._batch_min = None

    # ---- export ---------------------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, Tensor]:
        """θ repeated per latent: the tensor layout of a SAELens JumpReLU (a negative value means not estimated)."""
        return {"threshold": self.threshold.detach().expand(self.cfg.d_sae).clone()}  # [d_sae]

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        threshold = tensors.get("threshold")
        if threshold is None:
            raise ValueError(f"{self.architecture} checkpoint has no `threshold` tensor: "
                             "it was not saved by this class.")
        if threshold.numel() > 1 and not bool((threshold == threshold.flatten()[0]).all()):
            raise ValueError("BatchTopK needs one threshold for every latent; this checkpoint has per-latent "
                             "thresholds: load it as architecture='jumprelu'.")
        with torch.no_grad():
            self.threshold.copy_(threshold.flatten()[0])

    def saelens_extra_cfg(self) -> dict:
        return {"k": self.cfg.k}

    @torch.no_grad()
    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference SAE as a JumpReLU with θ_i = θ for every latent: identical `encode`/`decode`, and saved
        with `save_sae` it is a SAELens "jumprelu" folder (what SAELens itself writes for BatchTopK)."""
        shared = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(SAEConfig)}
        shared["metadata"] = {**self.cfg.metadata, "converted_from": self.architecture, "k": self.cfg.k}
        jump = JumpReLUSAE(JumpReLUConfig(**shared, apply_b_dec_to_input=True), seed=None)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "input_scale"):
            getattr(jump, name).copy_(getattr(self, name))
        theta = max(float(self.threshold), 0.0)  # θ = 0 (log θ = -inf) reproduces the ReLU of an unestimated θ
        jump.log_threshold.fill_(math.log(theta) if theta > 0 else -math.inf)
        return jump.to(self.W_dec.device)
