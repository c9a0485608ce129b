"""MP-SAE: an unrolled matching-pursuit encoder over a tied, unit-norm dictionary (docs/methods.md §7).

Costa, Fel, Lubana, Tolooshams, Ba 2025, "From Flat to Hierarchical: Extracting Sparse Representations with
Matching Pursuit", arXiv 2506.03093. Each step picks the atom most correlated with the residual, adds that
correlation to the atom's code and removes the projection, so x = b_dec + W_dec^T z + r holds exactly and ||r||
never grows (unit atoms). Loss: ||r_final||^2. Workbench choices, each a reading of the spec:

* `signed` is a class flag, so there are two registered names: "matching_pursuit" (positive selection, the
  authors' and SAELens's rule; saved in SAELens's MatchingPursuitSAE layout: W_dec, b_dec and the stop fields) and
  "matching_pursuit_signed" (`selection` abs_max = classical MP, or max = overcomplete's MpSAE; codes can be < 0).
* One budget `k` caps the steps; `residual_threshold` and `stop_on_duplicate_support` stop a token earlier (§7.3).
  The stop rules apply in training and inference alike (as in SAELens), so encode() returns forward()'s codes.
* Backward memory (§7.2, SAELENS-MP): the [B, n] correlations are computed without grad, only to pick indices; the
  kept coefficient is recomputed from the gathered rows, so each step saves [B, d], never [B, n]. x_hat is x - r,
  so not even the final decode keeps a [B, n] tensor.
* No AuxK: there are no pre-activations to rank dead latents by (SAELens-MP has no auxiliary loss either).
* Folding the dataset scalar s (§1.1): atoms must stay unit norm (§D.7, §D.11) and MP is positively homogeneous,
  MP(s r) = s MP(r). So export divides b_dec and residual_threshold by s and leaves W_dec alone: reconstructions
  and stopping are unchanged, and codes come out divided by s (raw-space coefficients), which is what SAELens
  computes from the exported folder.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saes import ops
from saes.base import SAE, SAEConfig, SAEOutput

SELECTIONS = ("relu_max", "abs_max", "max")


@dataclass
class MPConfig(SAEConfig):
    k: int = 32
    """Matching-pursuit steps per token: the fixed budget, and the cap when an early stop is on (so L0 <= k)."""
    residual_threshold: float = 0.0
    """Stop a token once ||r|| < this, in the SAE's working space (§7.3; SAELens uses 1e-2). 0 disables."""
    stop_on_duplicate_support: bool = False
    """Stop a token once a step adds no new latent, i.e. it re-picks one or finds nothing to add (§7.3)."""

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ValueError(f"k (matching-pursuit steps) must be >= 1, got {self.k}.")
        if not (self.residual_threshold >= 0 and math.isfinite(self.residual_threshold)):
            raise ValueError(f"residual_threshold must be >= 0 (0 disables the stop), got {self.residual_threshold}.")


@dataclass
class SignedMPConfig(MPConfig):
    selection: str = "abs_max"
    """abs_max: the atom with the largest |correlation| (classical MP); max: the largest signed correlation
    (overcomplete's MpSAE). Both keep the signed coefficient."""

    def validate(self) -> None:
        super().validate()
        if self.selection not in ("abs_max", "max"):
            raise ValueError(f"selection must be abs_max or max for matching_pursuit_signed, got {self.selection!r}; "
                             "for positive selection use architecture 'matching_pursuit'.")


class Pursuit(NamedTuple):
    codes: Tensor  # [batch, d_sae], coefficients accumulated over the steps
    residual: Tensor  # [batch, d_in], r after the last step, in the working space
    steps: Tensor  # [batch], steps each token actually took
    indices: Tensor  # [batch, steps_run], atom picked at each step (meaningless once a token stopped)
    coefs: Tensor  # [batch, steps_run], coefficient added at each step (0 once a token stopped)
    norms: Tensor  # [batch, steps_run + 1], ||r|| before the first step and after each step (detached)


def matching_pursuit(
    r: Tensor, W_dec: Tensor, k: int, selection: str = "relu_max", residual_threshold: float = 0.0,
    stop_on_duplicate_support: bool = False,
) -> Pursuit:
    """Up to k greedy steps on the centred input r = s*x - b_dec [batch, d_in] with unit atoms W_dec [d_sae, d_in]."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}.")
    batch, d_sae = r.shape[0], W_dec.shape[0]
    rows = torch.arange(batch, device=r.device)
    norms = [r.detach().norm(dim=-1)]
    done = norms[0] < residual_threshold  # [batch]; all False when the threshold is 0
    support = torch.zeros(batch, d_sae, dtype=torch.bool, device=r.device) if stop_on_duplicate_support else None
    steps = torch.zeros(batch, dtype=torch.long, device=r.device)
    indices, coefs = [], []
    for _ in range(k):
        if bool(done.all()):
            break
        with torch.no_grad():  # the argmax needs no gradient, so the [batch, d_sae] scores are never saved
            scores = r @ W_dec.T  # [batch, d_sae]
            j = (scores.abs() if selection == "abs_max" else scores).argmax(-1)  # [batch]
        atom = W_dec[j]  # [batch, d_in]
        a = (r * atom).sum(-1)  # [batch], <d_j, r> recomputed with grad from the gathered row
        if selection == "relu_max":
            a = a.relu()  # when every correlation is <= 0 the step adds nothing
        a = a.masked_fill(done, 0.0)
        r = r - a[:, None] * atom
        steps += (~done).long()
        indices.append(j)
        coefs.append(a)
        with torch.no_grad():
            norms.append(r.norm(dim=-1))
            if support is not None:
                fresh = ~support[rows, j] & (a != 0)
                support[rows, j] |= a != 0
                done = done | ~fresh
            if residual_threshold > 0:
                done = done | (norms[-1] < residual_threshold)
    index = torch.stack(indices, -1) if indices else rows.new_zeros(batch, 0)  # [batch, steps_run]
    coef = torch.stack(coefs, -1) if coefs else r.new_zeros(batch, 0)
    codes = r.new_zeros(batch, d_sae).scatter_add(-1, index, coef)  # repeats accumulate
    return Pursuit(codes, r, steps, index, coef, torch.stack(norms, -1))


class MPSAE(SAE):
    """Positive-selection MP-SAE; the encoder is the dictionary (no W_enc/b_enc parameters)."""

    architecture = "matching_pursuit"
    config_cls = MPConfig
    tied = True
    cfg: MPConfig

    @property
    def W_enc(self) -> Tensor:
        """The tied encoder: the dictionary itself, [d_sae, d_in]."""
        return self.W_dec

    @property
    def selection(self) -> str:
        return "relu_max"

    def pursue(self, x_scaled: Tensor) -> Pursuit:
        """The full pursuit of scaled inputs [batch, d_in] (codes, final residual, per-step trace)."""
        cfg = self.cfg
        return matching_pursuit(x_scaled - self.b_dec, self.W_dec, cfg.k, self.selection, cfg.residual_threshold,
                                cfg.stop_on_duplicate_support)

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """MP has no pre-activations. This is what its first step ranks, W_dec (s*x - b_dec); later steps rank the
        residual's correlations instead. [batch, d_in] -> [batch, d_sae]."""
        return (x_scaled - self.b_dec) @ self.W_dec.T

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return self.pursue(x_scaled).codes

    def encode(self, x: Tensor) -> Tensor:
        """Codes of raw activations, [..., d_in] -> [..., d_sae] (skips the unused pre_acts matmul)."""
        self._check_input(x)
        x_scaled = x.reshape(-1, x.shape[-1]).to(self.W_dec.dtype) * self.input_scale  # [batch, d_in]
        return self.pursue(x_scaled).codes.reshape(*x.shape[:-1], self.cfg.d_sae)

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        """Train-mode pass; loss = mean ||r_final||^2. pre_acts is None (§7.5)."""
        self._check_input(x)
        x_scaled = x.to(self.W_dec.dtype) * self.input_scale
        out = self.pursue(x_scaled)
        x_hat_scaled = x_scaled - out.residual  # = b_dec + z @ W_dec exactly, without a [batch, d_sae] matmul
        losses = {"mse": ops.mse_sum(x_scaled, x_hat_scaled)}
        metrics = {
            "fvu": ops.fvu(x_scaled, x_hat_scaled).detach(),
            "l0": (out.codes != 0).sum(-1).float().mean().detach(),
            "steps": out.steps.float().mean(),
        }
        return SAEOutput(x_hat_scaled / self.input_scale, out.codes, None, losses, metrics)

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        return {}

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """b_dec <- b_dec / s, residual_threshold <- residual_threshold / s, W_dec untouched (module docstring)."""
        s = float(self.input_scale)
        self.b_dec.div_(s)
        self.cfg.residual_threshold /= s
        self.input_scale.fill_(1.0)
        self.cfg.input_scale = 1.0

    def saelens_extra_cfg(self) -> dict:
        """SAELens MatchingPursuitSAEConfig fields: with threshold 0 and no duplicate stop it runs exactly k steps."""
        return {"residual_threshold": self.cfg.residual_threshold, "max_iterations": self.cfg.k,
                "stop_on_duplicate_support": self.cfg.stop_on_duplicate_support}


class SignedMPSAE(MPSAE):
    """Signed MP-SAE: coefficients keep the sign of the correlation, so consumers must not assume z >= 0."""

    architecture = "matching_pursuit_signed"
    config_cls = SignedMPConfig
    signed = True
    cfg: SignedMPConfig

    @property
    def selection(self) -> str:
        return self.cfg.selection
