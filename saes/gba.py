"""Group Bias Adaptation, GBA (Chen, Sheen, Xiong, Wang, Yang 2025, "Taming Polysemanticity in LLMs: Provable
Feature Recovery via Sparse Autoencoders", arXiv 2506.14002), docs/methods.md §9.3.

A ReLU SAE, z = relu(W_enc (s·x − b_dec) + b_enc), trained on the reconstruction alone: no L1, no TopK, no AuxK.
Sparsity comes from the encoder biases, which the optimiser never touches (b_enc has requires_grad False): they
are set by bias adaptation so that every latent fires at its group's target activation frequency (TAF). The
latents are cut into `n_groups` contiguous groups whose TAFs are geometrically spaced from `freq_max` (group 0) down
to `freq_min` (the last group), so frequent and rare features both have latents that resonate with them.

Bias adaptation (the workbench's rule; the paper's exact update could not be read, see below). Over a window of
`update_every` training steps each latent m records how many tokens it fired on (f̂_m = fired / tokens, with
fired ≥ 1/2 so a silent latent has a finite estimate) and the mean and spread σ_m of its bias-free pre-activation
v_m = e_m·(s·x − b_dec). At the end of the window

    b_m ← b_m − adapt_rate · σ_m · clamp(log(f̂_m / p_g), −max_log_step, max_log_step)

then b_m ← min(b_m, bias_max) when a bound is set. A latent firing more often than its target has its bias
lowered, a rarer one raised; the step is a damped Newton step in log-frequency for a roughly Gaussian tail (there
d log P(v > t)/dt is minus the hazard over σ, about −1.8/σ at 10 % and −3.4/σ at 0.1 %, so η = 0.3 takes 0.5 to 1
Newton step), scaled by σ_m so it does not depend on the encoder's norm. The very first update instead places
b_m = −(mean_m + σ_m Φ⁻¹(1 − p_g)), the Gaussian estimate of the (1 − p_g) quantile (`gaussian_start`): training
starts at b_enc = 0, where every latent fires on about half the tokens. Statistics are reset after every update.
Under torch.distributed the window statistics are averaged over ranks before the update, so every rank sets the
same biases.

b_dec is a constant of the encoder (it learns from the decoder side only): through the encoder it acts as one more
bias shared by every latent, which the reconstruction loss (with no sparsity term) keeps pushing up while the
adaptation pushes b_enc down; on planted data b_dec then drifted away from the data and the firing rates overshot.

What the sources say (§9.3): the paper's abstract and summaries give the mechanism (adapt biases so each group of
neurons meets its TAF; provable recovery for single-group bias adaptation under their data model; better sparsity vs
loss and cross-seed consistency than TopK and L1 on LLMs up to 1.5B/2B parameters). The authors' code
(FFishy-git/TamingSAE_GBA) and the algorithm box were not available here, so the update rule, its step size, the
window, the TAF grid and any bias bound are ours and exposed as config fields. The decoder rows are kept at unit
norm (§1.3) like the TopK family.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from saes.base import SAE, SAEConfig, SAEOutput


@dataclass
class GBAConfig(SAEConfig):
    n_groups: int = 10
    """Groups of latents (contiguous blocks of d_sae / n_groups), each with its own target frequency."""
    freq_max: float = 0.1
    """Target activation frequency of group 0, the most frequent."""
    freq_min: float = 0.001
    """Target activation frequency of the last group; the groups in between are spaced geometrically."""
    update_every: int = 4
    """Training steps per adaptation window (the statistics of those steps decide one bias update)."""
    adapt_rate: float = 0.3
    """Step size η of the update, in units of σ_m per unit of log(f̂_m / p_g)."""
    max_log_step: float = 6.0
    """Clamp on |log(f̂_m / p_g)| in one update (a silent latent's estimate is 1/(2·tokens))."""
    gaussian_start: bool = True
    """The first update places each bias at the Gaussian estimate of the (1 − p_g) quantile of v_m (window mean + σ_m
    Φ⁻¹(1 − p_g)) instead of taking a step: training starts at b_enc = 0, where every latent fires on about half the
    tokens, and one update then brings the frequencies near their targets."""
    bias_max: float | None = None
    """Upper bound on every encoder bias after an update (e.g. 0.0 keeps them non-positive); None: unbounded."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.n_groups <= self.d_sae:
            raise ValueError(f"n_groups must satisfy 0 < n_groups <= d_sae={self.d_sae}, got {self.n_groups}.")
        if not 0 < self.freq_min <= self.freq_max < 1:
            raise ValueError(f"freq_min and freq_max must satisfy 0 < freq_min <= freq_max < 1, got "
                             f"freq_min={self.freq_min}, freq_max={self.freq_max}.")
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1 (training steps per bias update), got {self.update_every}.")
        if not self.adapt_rate > 0 or not self.max_log_step > 0:
            raise ValueError(f"adapt_rate and max_log_step must be positive, got adapt_rate={self.adapt_rate}, "
                             f"max_log_step={self.max_log_step}.")

    def group_targets(self) -> list[float]:
        """p_g of every group: freq_max · (freq_min / freq_max)^(g / (G − 1))."""
        if self.n_groups == 1:
            return [self.freq_max]
        ratio = self.freq_min / self.freq_max
        return [self.freq_max * ratio ** (g / (self.n_groups - 1)) for g in range(self.n_groups)]


class GBASAE(SAE):
    architecture = "gba"
    config_cls = GBAConfig
    cfg: GBAConfig

    def __init__(self, cfg: GBAConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        self.b_enc.requires_grad_(False)  # set by bias adaptation only: the MSE gradient would only raise it
        # Statistics of the current adaptation window (float64: sums over many tokens); saved in checkpoints.
        self.register_buffer("window_fired", torch.zeros(cfg.d_sae, dtype=torch.float64))
        self.register_buffer("window_sum", torch.zeros(cfg.d_sae, dtype=torch.float64))
        self.register_buffer("window_sq_sum", torch.zeros(cfg.d_sae, dtype=torch.float64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.float64))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("bias_updates", torch.zeros((), dtype=torch.long))
        self._pending: tuple[Tensor, Tensor, Tensor, int] | None = None

    def group_of_latent(self) -> Tensor:
        """Group index of every latent [d_sae] (contiguous blocks)."""
        n = self.cfg.d_sae
        return torch.arange(n, device=self.b_enc.device) * self.cfg.n_groups // n

    def target_frequency(self) -> Tensor:
        """p_g of every latent's group [d_sae] (float64)."""
        targets = torch.tensor(self.cfg.group_targets(), dtype=torch.float64, device=self.b_enc.device)
        return targets[self.group_of_latent()]

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """u = W_enc (s·x − b_dec) + b_enc with b_dec a constant of the encoder: b_dec learns from the decoder only.
        Through the encoder it would act as one more bias shared by all latents, which the reconstruction pushes
        up without end while the adaptation pushes b_enc down (b_dec drifted away from the data)."""
        return (x_scaled - self.b_dec.detach()) @ self.W_enc.T + self.b_enc

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        return pre_acts.relu()

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        """None: GBA trains on the reconstruction alone (silent latents are revived by their bias, not AuxK)."""
        return {}

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        """The ReLU SAE's train-mode pass; also keeps this batch's firing statistics for `after_step`."""
        out = super().forward(x, dead_mask=dead_mask, grad=grad)
        with torch.no_grad():
            pre_acts = out.pre_acts.detach()
            free = (pre_acts - self.b_enc).double()  # v = e·(s·x − b_dec), the bias-free pre-activation
            self._pending = ((pre_acts > 0).sum(0).double(), free.sum(0), free.square().sum(0), pre_acts.shape[0])
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Decoder renormalisation, then the batch's statistics join the window; a full window adapts the biases."""
        super().after_step()
        if self._pending is None:
            return
        fired, total, sq_total, tokens = self._pending
        self._pending = None
        self.window_fired += fired
        self.window_sum += total
        self.window_sq_sum += sq_total
        self.window_tokens += tokens
        self.window_steps += 1
        if int(self.window_steps) >= self.cfg.update_every:
            self.adapt_biases()

    @torch.no_grad()
    def adapt_biases(self) -> None:
        """One bias update from the window's statistics (averaged over ranks when distributed); resets the window."""
        stats = torch.cat([self.window_fired, self.window_sum, self.window_sq_sum, self.window_tokens.reshape(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)  # the trainer averages buffers after each step; this is the mean
            stats /= torch.distributed.get_world_size()  # over ranks of each rank's current window
        n = self.cfg.d_sae
        fired, total, sq_total, tokens = stats[:n], stats[n:2 * n], stats[2 * n:3 * n], stats[3 * n]
        if float(tokens) > 0:
            self.b_enc.copy_(self.bias_update(self.b_enc.double(), fired, total, sq_total, tokens)
                             .to(self.b_enc.dtype))
            self.bias_updates += 1
        for buffer in (self.window_fired, self.window_sum, self.window_sq_sum, self.window_tokens):
            buffer.zero_()
        self.window_steps.zero_()

    def bias_update(self, bias: Tensor, fired: Tensor, total: Tensor, sq_total: Tensor, tokens: Tensor) -> Tensor:
        """The new biases [d_sae] from the current ones and a window's firing counts, sums and sums of squares of the
        bias-free pre-activations over `tokens` tokens (docstring of this module)."""
        target = self.target_frequency()
        mean = total / tokens
        spread = (sq_total / tokens - mean.square()).clamp_min(0).sqrt()
        if self.cfg.gaussian_start and int(self.bias_updates) == 0:
            new = -(mean + spread * torch.special.ndtri(1 - target))
        else:
            frequency = fired.clamp_min(0.5) / tokens
            step = (frequency / target).log().clamp(-self.cfg.max_log_step, self.cfg.max_log_step)
            new = bias - self.cfg.adapt_rate * spread * step
        if self.cfg.bias_max is not None:
            new = new.clamp(max=self.cfg.bias_max)
        return new

    def saelens_extra_cfg(self) -> dict:
        """A ReLU SAE that subtracts b_dec before encoding: SAELens's "standard" with apply_b_dec_to_input."""
        return {"architecture": "standard", "apply_b_dec_to_input": True}


def expected_l0(cfg: GBAConfig) -> float:
    """Mean latents per token once every latent meets its target: Σ_m p_{g(m)}."""
    groups = torch.arange(cfg.d_sae) * cfg.n_groups // cfg.d_sae
    return float(torch.tensor(cfg.group_targets(), dtype=torch.float64)[groups].sum())
