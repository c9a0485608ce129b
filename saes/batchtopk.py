"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410), docs/methods.md §3.1.

Training keeps the k*batch largest activations of the whole batch, so the mean L0 is exactly k while each token
gets as many latents as it needs. That rule depends on the other tokens, so inference uses a single threshold θ
instead (z = u * [u > θ], JumpReLU with one θ for every latent). θ is the paper's: the mean over training batches
of the smallest activation the batch kept, measured with the final weights frozen (saes/thresholds.py; the
trainer does it at the end). dictionary_learning and SAELens track θ with an EMA during training instead, which
lags the encoder and, on short runs, left inference L0 far below k. `to_jumprelu()` turns the SAE into the
equivalent SAELens "jumprelu".
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import ops
from saes import sparse_topk as fast
from saes.base import SAE, SAEConfig, check_k
from saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saes.thresholds import require_calibrated


@dataclass
class BatchTopKConfig(SAEConfig):
    k: int = 32
    """Mean active latents per token: a training batch keeps its k*batch largest activations."""
    kernel: str = "sparse"
    """Training path. 'sparse' (default): the fast path of saes/sparse_topk.py, where the k*batch kept (token, latent)
    pairs are a flat list, so the encoder backward and the decode touch only them (AuxK only the dead latents);
    'dense' (`--sae-options kernel dense`): the reference path through dense [batch, d_sae] codes. Same selection,
    values and gradients."""

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae)
        fast.check_kernel(self.kernel, None)


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    config_cls = BatchTopKConfig
    batch_dependent = True
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        # θ in the pre-activation space (unchanged by folding the input scale); < 0 means "not calibrated yet",
        # and inference then refuses (saes/thresholds.py).
        self.register_buffer("threshold", torch.tensor(-1.0))

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        if train:
            return ops.batch_topk_codes(pre_acts, self.cfg.k)  # [batch, d_sae]
        require_calibrated(self)
        return pre_acts * (pre_acts > self.threshold)  # per token: never batch-dependent

    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        # Ranking u instead of relu(u) (no [batch, d_sae] copy) keeps the same positive entries; when fewer than
        # k*batch are positive both fill up with entries whose ReLU'd code is 0, so codes and gradients are equal.
        return fast.Selection.batch_topk(pre_acts, self.cfg.k * pre_acts.shape[0])

    @staticmethod
    def smallest_kept(codes: Tensor) -> Tensor:
        """This batch's observation of θ: the smallest kept |z| (inf when nothing was kept). [batch, d_sae] -> []."""
        smallest = ops.min_kept(codes)
        return codes.new_tensor(torch.inf) if smallest is None else smallest

    @staticmethod
    def smallest_kept_values(values: Tensor) -> Tensor:
        """`smallest_kept` from the kept values of the fast path's selection (any shape) -> []."""
        magnitudes = values.detach().abs()
        return magnitudes.masked_fill(magnitudes == 0, torch.inf).min() if magnitudes.numel() else \
            magnitudes.new_tensor(torch.inf)

    # ---- export ---------------------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, Tensor]:
        """θ repeated per latent: the tensor layout of a SAELens JumpReLU (a negative value means not calibrated)."""
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
        require_calibrated(self)
        theta = float(self.threshold)
        jump.log_threshold.fill_(math.log(theta) if theta > 0 else -math.inf)
        return jump.to(self.W_dec.device)
