"""Mutual Choice and Feature Choice SAEs (Ayonrinde 2024, arXiv 2411.02124; no released code), docs/methods.md §6.

Both treat sparsity as a budget of k*batch token-latent matches per batch rather than k per token.
* Mutual Choice (§6.1) constrains only the total: keep the k*batch largest activations of the batch. That is BatchTopK
  (§3.1) exactly, so `MutualChoiceSAE` is `BatchTopKSAE` under another name (same selection, same global threshold).
* Feature Choice (§6.2): latent j keeps its m_j strongest tokens of the batch, sum_j m_j = k*batch. A token may get
  no latent at all (logged as `zero_latent_frac`).

Our choices where the paper is unverified ([U] in the spec):
* capacities: "uniform" m_j = k*batch/d_sae, or "zipf" m_j ∝ (j+1)^-s by latent index; shares above the batch are
  capped and the rest re-spread, then largest-remainder rounding makes them sum to k*batch exactly;
* single-token inference (§6.4, our design): per-latent JumpReLU thresholds θ_j, saved as `threshold`, calibrated
  like BatchTopK's θ once training ends (saes/thresholds.py): θ_j is the mean over training batches of the smallest
  activation latent j kept, with the final weights frozen; a latent that never kept a token never fires. Capacities
  follow the current k, so k-annealing changes them step by step;
* aux_zipf (§6.3) is EXPERIMENTAL and its formula is our reading: AuxK over the latents whose EMA firing frequency is
  below gamma times their Zipf-expected frequency (plus any dead ones), instead of over dead latents only.
"""
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import ops
from saes.base import SAE, SAEConfig, SAEOutput, check_k
from saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saes.thresholds import require_calibrated


@dataclass
class MutualChoiceConfig(BatchTopKConfig):
    """Mutual Choice is BatchTopK (§6.1): the same fields with the same meaning."""


class MutualChoiceSAE(BatchTopKSAE):
    """BatchTopK under the name of Ayonrinde's concurrent paper; kept separate so checkpoints say which was meant."""

    architecture = "mutual_choice"
    config_cls = MutualChoiceConfig


def zipf_weights(d_sae: int, exponent: float) -> Tensor:
    """(j+1)^-exponent for latent j, float64 [d_sae]."""
    return torch.arange(1, d_sae + 1, dtype=torch.float64).pow(-exponent)


def feature_capacities(d_sae: int, batch: int, k: int, exponent: float | None) -> Tensor:
    """Tokens each latent may keep in a batch: long [d_sae] with sum k*batch and 0 <= m_j <= batch (§6.7.5).

    exponent None gives uniform shares, else m_j ∝ (j+1)^-exponent. Shares above `batch` are capped and the excess is
    re-spread over the other latents in proportion (water-filling); largest-remainder rounding keeps the sum exact.
    """
    total = k * batch
    weights = torch.ones(d_sae, dtype=torch.float64) if exponent is None else zipf_weights(d_sae, exponent)
    capped = torch.zeros(d_sae, dtype=torch.bool)
    while True:  # each pass caps at least one more latent, so at most d_sae passes
        free = total - batch * int(capped.sum())
        share = torch.where(capped, float(batch), weights * free / weights[~capped].sum().clamp_min(1e-300))
        over = share > batch
        if not over.any():
            break
        capped |= over
    counts = share.floor()
    missing = int(round(total - counts.sum().item()))
    counts[(share - counts).argsort(descending=True, stable=True)[:missing]] += 1
    return counts.long()


def feature_choice_codes(pre_acts: Tensor, capacities: Tensor) -> Tensor:
    """Dense codes where latent j keeps its capacities[j] largest ReLU'd activations over the batch (§6.2).

    pre_acts: [batch, d_sae]; capacities: long [d_sae], each <= batch -> codes [batch, d_sae].
    """
    acts = pre_acts.relu()
    m_max = int(capacities.max())
    if m_max == 0:
        return torch.zeros_like(acts)
    values, tokens = acts.topk(m_max, dim=0, sorted=True)  # [m_max, d_sae]: row r is each latent's (r+1)-th token
    keep = torch.arange(m_max, device=acts.device)[:, None] < capacities.to(acts.device)[None, :]  # [m_max, d_sae]
    # A latent's tokens are distinct, so the zeros written for ranks >= m_j never overwrite a kept value.
    return torch.zeros_like(acts).scatter(0, tokens, values * keep)


@dataclass
class FeatureChoiceConfig(SAEConfig):
    k: int = 32
    """Mean active latents per token: a batch has k*batch token-latent matches, split across latents."""
    capacity: str = "uniform"
    """How the k*batch matches are split: "uniform" or "zipf" (latent j gets a share ∝ (j+1)^-zipf_exponent)."""
    zipf_exponent: float = 1.0
    """Exponent s of the Zipf capacities and of aux_zipf's expected frequencies."""
    aux_zipf: bool = False
    """EXPERIMENTAL (§6.3, formula is our reading): AuxK over under-used latents instead of dead ones."""
    aux_zipf_gamma: float = 0.1
    """aux_zipf: a latent is under-used when it fires below gamma times its Zipf-expected frequency."""
    aux_zipf_decay: float = 0.99
    """aux_zipf: EMA decay of the per-latent firing frequencies."""

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae)
        if self.capacity not in ("uniform", "zipf"):
            raise ValueError(f"capacity must be 'uniform' or 'zipf', got {self.capacity!r}.")
        if self.zipf_exponent < 0 or self.aux_zipf_gamma <= 0:
            raise ValueError(f"zipf_exponent must be >= 0 and aux_zipf_gamma > 0, got {self.zipf_exponent}, "
                             f"{self.aux_zipf_gamma}.")
        if not 0.0 <= self.aux_zipf_decay < 1.0:
            raise ValueError(f"aux_zipf_decay must be in [0, 1), got {self.aux_zipf_decay}.")


class FeatureChoiceSAE(SAE):
    architecture = "feature_choice"
    config_cls = FeatureChoiceConfig
    batch_dependent = True
    cfg: FeatureChoiceConfig

    def __init__(self, cfg: FeatureChoiceConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        # θ_j < 0 means "not calibrated yet" (inference refuses); +inf means latent j never fires.
        self.register_buffer("threshold", torch.full((cfg.d_sae,), -1.0))
        # EMA of each latent's training firing rate (aux_zipf); < 0: unknown. Persistent, so a resume is exact.
        self.register_buffer("firing_freq", torch.full((cfg.d_sae,), -1.0))
        self._fired: Tensor | None = None  # [d_sae], share of this batch's tokens each latent kept; for after_step
        self._capacities: dict[tuple[int, int], Tensor] = {}

    def capacities(self, batch: int) -> Tensor:
        """m_j for a batch of this many tokens at the current k, long [d_sae] (cached per (batch, k))."""
        key = (batch, self.cfg.k)
        if key not in self._capacities:
            exponent = self.cfg.zipf_exponent if self.cfg.capacity == "zipf" else None
            self._capacities[key] = feature_capacities(self.cfg.d_sae, batch, self.cfg.k, exponent)
        return self._capacities[key]

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        if not train:
            require_calibrated(self)
            return pre_acts * (pre_acts > self.threshold)  # per token: never batch-dependent
        codes = feature_choice_codes(pre_acts, self.capacities(pre_acts.shape[0]))  # [batch, d_sae]
        self._fired = (codes.detach() != 0).float().mean(0).to(self.firing_freq.dtype)
        return codes

    @staticmethod
    def smallest_kept(codes: Tensor) -> Tensor:
        """This batch's observation of θ_j: latent j's smallest kept code, inf where it kept none. -> [d_sae]."""
        kept = codes.detach()
        return kept.masked_fill(kept <= 0, torch.inf).amin(0)

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        out = super().forward(x, dead_mask=dead_mask, grad=grad)
        out.metrics["zero_latent_frac"] = ((out.codes != 0).sum(-1) == 0).float().mean().detach()
        return out

    def after_step(self) -> None:
        """Renormalise the decoder, then fold this batch's firing rates into their EMA (used by aux_zipf)."""
        super().after_step()
        if self._fired is None:
            return
        decay = self.cfg.aux_zipf_decay
        self.firing_freq.copy_(torch.where(self.firing_freq < 0, self._fired,
                                           decay * self.firing_freq + (1 - decay) * self._fired))
        self._fired = None

    def under_used(self) -> Tensor:
        """Latents firing below gamma times their Zipf-expected frequency (§6.3, experimental) -> bool [d_sae].

        With Zipf capacities a latent's Zipf rank is its index; with uniform ones, its rank by observed frequency.
        """
        weights = zipf_weights(self.cfg.d_sae, self.cfg.zipf_exponent).to(self.firing_freq.device)
        expected = (self.cfg.k * weights / weights.sum()).clamp(max=1.0).to(self.firing_freq.dtype)  # per token
        if self.cfg.capacity == "uniform":
            expected = expected[self.firing_freq.argsort(descending=True).argsort()]
        return self.firing_freq < self.cfg.aux_zipf_gamma * expected

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        if not self.cfg.aux_zipf:
            return super().aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask)
        if self.cfg.effective_aux_k == 0 or bool((self.firing_freq < 0).any()):  # no frequencies measured yet
            return {}
        mask = self.under_used() if dead_mask is None else self.under_used() | dead_mask
        if not bool(mask.any()):
            return {}
        aux = ops.auxk_loss(pre_acts, x_scaled - x_hat_scaled, self.W_dec, mask, self.cfg.effective_aux_k)
        return {"aux_zipf": self.cfg.aux_coef * aux}

    # ---- export ---------------------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, Tensor]:
        """θ_j [d_sae], the layout of a SAELens JumpReLU threshold (a negative value means not calibrated)."""
        return {"threshold": self.threshold.detach().clone()}

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "threshold" not in tensors:
            raise ValueError(f"{self.architecture} checkpoint has no `threshold` tensor: not saved by this class.")
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"])

    def saelens_extra_cfg(self) -> dict:
        return {"k": self.cfg.k}

    @torch.no_grad()
    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference SAE as a JumpReLU with these θ_j: identical `encode`/`decode`, a SAELens "jumprelu" folder."""
        shared = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(SAEConfig)}
        shared["metadata"] = {**self.cfg.metadata, "converted_from": self.architecture, "k": self.cfg.k}
        jump = JumpReLUSAE(JumpReLUConfig(**shared, apply_b_dec_to_input=True), seed=None)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "input_scale"):
            getattr(jump, name).copy_(getattr(self, name))
        require_calibrated(self)
        jump.log_threshold.copy_(self.threshold.log())  # θ = 0 -> log θ = -inf: plain ReLU; θ = inf: never fires
        return jump
