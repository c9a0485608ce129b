"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, arXiv 2503.17547), docs/methods.md §9.1.

The latents are cut, in one global order, into nested groups: prefix g holds the first m_g latents,
m_1 < m_2 < ... < m_G = d_sae. Codes are BatchTopK's (the k·B largest relu(u) of the batch, this class's parent),
and every prefix must reconstruct on its own: prefix g decodes x̂_g = b_dec + Σ_{i < m_g} z_i d_i, and the loss is

    L = Σ_g w_g ‖s·x − x̂_g‖² (mean over tokens)  +  (1/32)·AuxK on the full residual s·x − x̂_G

with w_g = 1/G by default, so the reconstruction term is the mean of the prefix errors and one group is exactly
BatchTopK. Inference is BatchTopK's: one threshold θ calibrated after training (saes/thresholds.py), and
`to_jumprelu()` gives the SAELens "jumprelu" it saves as.

Choices where the sources differ (§9.1): the paper writes a plain sum over prefixes; dictionary_learning multiplies
each prefix error by w_g = 1/G and then averages over groups (1/G² overall); Bussmann's own repository averages the
per-element MSE of the G prefixes and of the empty prefix (b_dec alone) over G + 1 terms. We take the mean over the G
prefixes (weights `group_weights` to change it), which keeps AuxK's weight relative to the reconstruction what it is
for BatchTopK. Group sizes come from `group_sizes`, or `group_fractions` (each group int(f·n), the last takes the
remainder, as dictionary_learning), default fractions 1/16, 1/16, 1/8, 1/4, 1/2 (Bussmann's repository).

Fast path (kernel 'sparse', the default): the kept pairs are BatchTopK's flat list; each pair is filed under
(token, group) — groups are contiguous latent ranges and the list is sorted by token then latent, so the key is
sorted too — and one gather-sum per (token, group) bag gives every group's part of the decode; a cumulative sum over
groups gives all the prefix reconstructions. Work is O(k·B·d + B·G·d), with the same values and gradients as the
dense path (tests/saes/test_matryoshka.py, float64).
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import ops
from saes import sparse_topk as fast
from saes.base import SAEOutput
from saes.batchtopk import BatchTopKConfig, BatchTopKSAE

DEFAULT_GROUP_FRACTIONS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
"""Bussmann's repository (main.py): groups of n/16, n/16, n/8, n/4, n/2 latents."""


@dataclass
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    group_sizes: list[int] | None = None
    """Latents in each group, in order; they must sum to d_sae. Give this or `group_fractions`, not both."""
    group_fractions: list[float] | None = None
    """Share of d_sae in each group (summing to 1): group g gets int(f_g·d_sae) latents, the last the remainder.
    None (with no `group_sizes`) means 1/16, 1/16, 1/8, 1/4, 1/2."""
    group_weights: list[float] | None = None
    """Weight w_g of prefix g's reconstruction error; None means 1/G each (the mean over prefixes)."""

    def __post_init__(self) -> None:
        for name in ("group_sizes", "group_fractions", "group_weights"):  # tuples would not survive cfg.json
            value = getattr(self, name)
            if value is not None and not isinstance(value, list):
                setattr(self, name, list(value))

    @property
    def sizes(self) -> list[int]:
        """Latents per group."""
        if self.group_sizes is not None:
            return [int(size) for size in self.group_sizes]
        fractions = self.group_fractions if self.group_fractions is not None else DEFAULT_GROUP_FRACTIONS
        sizes = [int(f * self.d_sae) for f in fractions[:-1]]
        return sizes + [self.d_sae - sum(sizes)]

    @property
    def boundaries(self) -> list[int]:
        """Prefix lengths m_1 < ... < m_G = d_sae."""
        ends, total = [], 0
        for size in self.sizes:
            total += size
            ends.append(total)
        return ends

    @property
    def weights(self) -> list[float]:
        """w_g of every prefix."""
        groups = len(self.sizes)
        return [float(w) for w in self.group_weights] if self.group_weights is not None else [1.0 / groups] * groups

    def validate(self) -> None:
        super().validate()
        if self.group_sizes is not None and self.group_fractions is not None:
            raise ValueError("Give group_sizes or group_fractions, not both.")
        if self.group_fractions is not None:
            if not self.group_fractions or any(not f > 0 for f in self.group_fractions):
                raise ValueError(f"group_fractions must be positive numbers, got {self.group_fractions}.")
            if not math.isclose(sum(self.group_fractions), 1.0, rel_tol=1e-6):
                raise ValueError(f"group_fractions must sum to 1, got {self.group_fractions} "
                                 f"(sum {sum(self.group_fractions)}).")
        sizes = self.sizes
        if not sizes or any(size <= 0 for size in sizes) or sum(sizes) != self.d_sae:
            source = "group_sizes" if self.group_sizes is not None else "group_fractions"
            raise ValueError(f"{source} must give positive group sizes summing to d_sae={self.d_sae}, got sizes "
                             f"{sizes}: pass group_sizes explicitly (small dictionaries cannot take the default "
                             "fractions 1/16, 1/16, 1/8, 1/4, 1/2).")
        if self.group_weights is not None:
            if len(self.group_weights) != len(sizes) or any(w < 0 for w in self.group_weights) \
                    or not sum(self.group_weights) > 0:
                raise ValueError(f"group_weights must be {len(sizes)} non-negative numbers (one per group, not all "
                                 f"0), got {self.group_weights}.")


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    config_cls = MatryoshkaBatchTopKConfig
    cfg: MatryoshkaBatchTopKConfig

    # ---- training ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        """Train-mode pass: BatchTopK codes; `mse` = Σ_g w_g mse of prefix g; x̂ and AuxK use the whole dictionary.
        Metrics: FVU and L0 of the whole dictionary, and `fvu_m{m_g}` of every prefix."""
        self._check_input(x)
        self._check_trainable()
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        if self.fast_path:
            return self._nested_fast_forward(x_scaled, dead_mask, grad)
        pre_acts = self.pre_acts(x_scaled)
        codes = self.select(pre_acts, train=True, x_scaled=x_scaled, grad=grad)
        prefixes = self.prefix_reconstructions(codes)  # G x [batch, d_in], scaled space, with b_dec
        x_hat_scaled = prefixes[-1]
        losses = {"mse": self._nested_mse(x_scaled, prefixes)}
        losses.update(self.aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask))
        metrics = {"fvu": ops.fvu(x_scaled, x_hat_scaled).detach(),
                   "l0": (codes != 0).sum(-1).float().mean().detach(),
                   **self._prefix_metrics(x_scaled, prefixes)}
        return SAEOutput(x_hat_scaled / self.input_scale, codes, pre_acts, losses, metrics)

    def prefix_reconstructions(self, codes: Tensor) -> list[Tensor]:
        """x̂_g = b_dec + Σ_{i < m_g} z_i d_i for every prefix g, in the scaled space (dense codes [batch, d_sae] ->
        G tensors [batch, d_in]), accumulated group by group so the whole decode costs one matmul."""
        start, recon, out = 0, self.b_dec, []
        for end in self.cfg.boundaries:
            recon = recon + codes[:, start:end] @ self.W_dec[start:end]
            out.append(recon)
            start = end
        return out

    def _nested_mse(self, x_scaled: Tensor, prefixes) -> Tensor:
        terms = [w * ops.mse_sum(x_scaled, recon) for w, recon in zip(self.cfg.weights, prefixes)]
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def _prefix_metrics(self, x_scaled: Tensor, prefixes) -> dict[str, Tensor]:
        return {f"fvu_m{m}": ops.fvu(x_scaled, recon).detach() for m, recon in zip(self.cfg.boundaries, prefixes)}

    def group_selection(self, selection: fast.Selection) -> fast.Selection:
        """The same kept pairs, each filed under the bag (token, group) = token·G + group, so one gather-sum returns
        every group's part of every token's decode [batch·G, d_in]. Needs the flat layout sorted by token then
        latent (`Selection.from_flat`): groups are contiguous latent ranges, so the bag keys are sorted too."""
        groups = len(self.cfg.sizes)
        inner = torch.tensor(self.cfg.boundaries[:-1], device=selection.indices.device,
                             dtype=selection.indices.dtype)
        group = torch.searchsorted(inner, selection.indices, right=True)  # latents in [m_{g-1}, m_g) -> g
        bags = selection.tokens * groups + group
        offsets = torch.searchsorted(bags, torch.arange(selection.batch * groups, device=bags.device,
                                                        dtype=bags.dtype))
        return fast.Selection(selection.indices, selection.d_sae, tokens=bags, offsets=offsets)

    def _nested_fast_forward(self, x_scaled: Tensor, dead_mask: Tensor | None, grad: Tensor | None) -> SAEOutput:
        x_centered, pre_acts = fast.encoder_pre_acts(x_scaled, self.b_dec, self.W_enc, self.b_enc,
                                                     self.pre_acts_buffer)
        selection = self.select_sparse(pre_acts, x_scaled=x_scaled, grad=grad)
        values = fast.gather_pre_acts(pre_acts, x_centered, self.b_dec, self.W_enc, self.b_enc, selection).relu()
        batch, groups = x_scaled.shape[0], len(self.cfg.sizes)
        parts = fast.sparse_decode(values, self.W_dec, self.group_selection(selection))  # [batch·G, d_in]
        nested = parts.view(batch, groups, -1).cumsum(1) + self.b_dec  # [batch, G, d_in]
        prefixes = nested.unbind(1)
        x_hat_scaled = prefixes[-1]
        losses = {"mse": self._nested_mse(x_scaled, prefixes)}
        if dead_mask is not None and self.cfg.effective_aux_k > 0:  # exactly 0 when no latent is dead (no sync)
            aux = fast.fast_auxk(pre_acts, x_centered, (x_scaled - x_hat_scaled).detach(), self.b_dec, self.W_enc,
                                 self.b_enc, self.W_dec, dead_mask, self.cfg.effective_aux_k)
            losses["auxk"] = self.cfg.aux_coef * aux
        metrics = {"fvu": ops.fvu(x_scaled, x_hat_scaled).detach(),
                   "l0": ((values != 0).sum() / batch).float().detach(),
                   **self._prefix_metrics(x_scaled, prefixes)}
        return SAEOutput(x_hat_scaled / self.input_scale, None, pre_acts, losses, metrics, values=values,
                         selection=selection)

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefix_fvu(self, x: Tensor) -> dict[int, float]:
        """Pooled FVU of raw activations x [batch, d_in] reconstructed by each nested dictionary alone, with the
        inference codes (calibrated θ): {m_g: fvu}."""
        self._check_input(x)
        x = x.reshape(-1, x.shape[-1])
        codes = self.encode(x)
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        return {m: float(ops.fvu(x_scaled, recon))
                for m, recon in zip(self.cfg.boundaries, self.prefix_reconstructions(codes))}
