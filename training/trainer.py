"""A minimal SAE training loop (issue 5 grows it into the full trainer).

It already does what every variant needs: Adam, LR warm-up and linear decay (algorithms.md §1.6), the
variant's step hooks (gradient projection and decoder renormalisation, §1.3), gradient clipping, and dead
latents counted in tokens (§1.4) feeding AuxK (§1.5).
"""
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saes.base import SAE


@dataclass
class LoopConfig:
    lr: float | None = None
    """Adam learning rate; None uses 2e-4 / sqrt(d_sae / 2^14) (algorithms.md §1.6)."""
    warmup_steps: int = 1000
    """Linear LR warm-up, capped at 10% of the run."""
    decay_start: float = 0.8
    """Fraction of the run after which the LR decays linearly to 0."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead (§1.4)."""


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """Multiplier of the base LR at `step` (0-based) of `total` steps."""
    warmup = min(warmup, max(total // 10, 1))
    if step < warmup:
        return (step + 1) / warmup
    start = int(decay_start * total)
    if step >= start and total > start:
        return max(0.0, (total - step) / (total - start))
    return 1.0


class DeadLatentCounter:
    """tokens_since_fired per latent (§1.4); a latent fires when its code is non-zero (signed codes included)."""

    def __init__(self, d_sae: int, threshold: int, device: torch.device | str = "cpu"):
        self.threshold = threshold
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, codes: Tensor) -> None:
        """codes: [batch, d_sae]."""
        fired = (codes != 0).any(0)
        self.tokens_since_fired += codes.shape[0]
        self.tokens_since_fired[fired] = 0

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold


def as_pair(batch: Tensor | tuple) -> tuple[Tensor, Tensor | None]:
    """Batches are a tensor x [batch, d_in] or a pair (x, grad) for variants that need gradients."""
    if isinstance(batch, Tensor):
        return batch, None
    x, grad = batch
    return x, grad


def train_sae(
    sae: SAE,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    steps: int,
    cfg: LoopConfig | None = None,
    *,
    progress: bool = True,
    on_step=None,
) -> list[dict[str, float]]:
    """Train `sae` in place for `steps` batches; returns the per-step losses and metrics."""
    cfg = cfg or LoopConfig()
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
    optimizer = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=(0.9, 0.999))
    counter = DeadLatentCounter(sae.cfg.d_sae, cfg.dead_tokens, device=sae.W_dec.device)
    history: list[dict[str, float]] = []
    iterator: Iterator = iter(batches)
    bar = tqdm(range(steps), desc=f"train {sae.architecture}", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        try:
            x, grad = as_pair(next(iterator))
        except StopIteration:
            break
        for group in optimizer.param_groups:
            group["lr"] = base_lr * lr_factor(step, steps, cfg.warmup_steps, cfg.decay_start)
        out = sae(x, dead_mask=counter.dead_mask, grad=grad)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite loss {loss.item()} at step {step}: lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.after_backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        sae.after_step()
        counter.update(out.codes.detach())
        record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in out.losses.items()},
                  **{k: v.item() for k, v in out.metrics.items()},
                  "dead_frac": counter.dead_mask.float().mean().item(), "tokens": (step + 1) * x.shape[0]}
        history.append(record)
        if on_step is not None:
            on_step(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}", fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}")
    return history
