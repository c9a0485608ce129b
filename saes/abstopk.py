"""AbsTopK SAE (Zhu, Khalili, Zhu 2025, arXiv 2510.00404), docs/methods.md §4.

The k latents of largest |u| keep their signed value (no ReLU): the hard-thresholding proximal step of
k-sparse coding without a sign constraint, so one latent can carry both poles of a bidirectional concept.
Codes are signed (`signed = True`): a latent fires when z != 0, and tools that assume z >= 0 must refuse it
(`saes.base.require_nonnegative`).
Selection scope (config `selection`): "per_token" is the paper's H_k and SAELens's "abstopk"; "batch" keeps
the k*batch largest |u| of the batch, like the released code's `BatchAbsoluteKSAE` (unverified, §4.2), and
then infers per token with a magnitude threshold z = u * [|u| > θ], θ calibrated exactly as BatchTopK's (the mean
over training batches of the smallest kept |u|, final weights frozen).
AuxK ranks dead latents by |u| and keeps their sign (a workbench choice, as SAELens does).
"""
from dataclasses import dataclass

from torch import Tensor

from saes import ops
from saes import sparse_topk as fast
from saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saes.thresholds import require_calibrated

SELECTIONS = ("per_token", "batch")


def abs_topk_codes(pre_acts: Tensor, k: int) -> Tensor:
    """H_k: keep the k entries of largest |u| per token, with their sign. [batch, d_sae] -> [batch, d_sae]."""
    indices = pre_acts.abs().topk(k, dim=-1, sorted=False).indices  # [batch, k]
    return pre_acts.new_zeros(pre_acts.shape).scatter(-1, indices, pre_acts.gather(-1, indices))


@dataclass
class AbsTopKConfig(BatchTopKConfig):
    selection: str = "batch"
    """Selection scope: "per_token" (the paper's H_k; SAELens-compatible) or "batch" (top-k*batch |u|)."""

    def validate(self) -> None:
        super().validate()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}.")


class AbsTopKSAE(BatchTopKSAE):
    architecture = "abstopk"
    config_cls = AbsTopKConfig
    signed = True
    cfg: AbsTopKConfig

    @property
    def batch_dependent(self) -> bool:  # type: ignore[override]
        return self.cfg.selection == "batch"

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        if self.cfg.selection == "per_token":
            return abs_topk_codes(pre_acts, self.cfg.k)
        if train:
            return ops.batch_topk_codes(pre_acts, self.cfg.k, signed=True)  # [batch, d_sae]
        require_calibrated(self)
        return pre_acts * (pre_acts.abs() > self.threshold)

    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        if self.cfg.selection == "per_token":
            return fast.Selection.topk(pre_acts.abs(), self.cfg.k)
        return fast.Selection.batch_topk(pre_acts.abs(), self.cfg.k * pre_acts.shape[0])

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        """AuxK (§1.5) with dead latents ranked by |u| and decoded with their sign."""
        if dead_mask is None or self.cfg.effective_aux_k == 0 or not bool(dead_mask.any()):
            return {}
        aux = ops.auxk_loss(pre_acts, x_scaled - x_hat_scaled, self.W_dec, dead_mask, self.cfg.effective_aux_k,
                            signed=True)
        return {"auxk": self.cfg.aux_coef * aux}

    def to_jumprelu(self):
        """Refused: a JumpReLU keeps only positive codes, and SAELens has no symmetric (|u| > θ) variant."""
        raise ValueError("AbsTopK codes are signed, so it has no JumpReLU equivalent: train with "
                         "selection='per_token' to export it as SAELens's 'abstopk'.")

    def extra_tensors(self) -> dict[str, Tensor]:
        """Batch mode saves θ (a SAELens loader then refuses the folder: it has no symmetric JumpReLU);
        per-token mode saves nothing extra, which is exactly SAELens's "abstopk" layout."""
        return super().extra_tensors() if self.cfg.selection == "batch" else {}

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        if self.cfg.selection == "batch":
            super().load_extra_tensors(tensors)
