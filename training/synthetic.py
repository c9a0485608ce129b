"""Planted-dictionary data: activations built from known unit directions, so recovery can be measured.

x = sum_{j active} c_j g_j + noise, with latent j active with a Zipf-distributed probability,
magnitudes c_j ~ 1 + |N(0, 0.5)| (non-negative, like real features), and some correlated pairs that
tend to fire together. Used by the variant tests (issue 4), the benchmark and the evals' ground-truth metrics.
"""
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PlantedDictionary:
    directions: Tensor  # [n_true, d] unit rows
    probs: Tensor  # [n_true] firing probability of each direction
    pairs: Tensor  # [n_pairs, 2] (leader, follower): the follower fires with its leader with prob 0.8
    noise: float

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n activations [n, d]."""
        n_true, d = self.directions.shape
        active = torch.rand(n, n_true, generator=generator) < self.probs  # [n, n_true]
        if len(self.pairs):
            follow = torch.rand(n, len(self.pairs), generator=generator) < 0.8
            active[:, self.pairs[:, 1]] |= active[:, self.pairs[:, 0]] & follow
        magnitudes = 1.0 + 0.5 * torch.randn(n, n_true, generator=generator).abs()
        codes = active.float() * magnitudes  # [n, n_true]
        return codes @ self.directions + self.noise * torch.randn(n, d, generator=generator)

    def batches(self, batch_size: int, seed: int = 0):
        """Endless stream of [batch_size, d] batches, deterministic for a seed."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, generator)


def make_planted(
    d: int = 64, n_true: int = 256, mean_active: float = 5.0, zipf_exponent: float = 1.0,
    n_pairs: int = 8, noise: float = 0.01, seed: int = 0,
) -> PlantedDictionary:
    """A planted dictionary whose expected number of active directions per sample is about `mean_active`."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    ranks = torch.arange(1, n_true + 1, dtype=torch.float32)
    weights = ranks.pow(-zipf_exponent)
    probs = (mean_active * weights / weights.sum()).clamp(max=0.5)
    perm = torch.randperm(n_true, generator=generator)[: 2 * n_pairs]
    pairs = perm.reshape(n_pairs, 2) if n_pairs else torch.zeros(0, 2, dtype=torch.long)
    return PlantedDictionary(directions, probs, pairs, noise)


def best_cosines(W_dec: Tensor, directions: Tensor) -> Tensor:
    """For every planted direction [n_true, d], the best |cosine| with any decoder row [d_sae, d] -> [n_true]."""
    dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (directions @ dec.T).abs().max(dim=-1).values


def mean_best_cosine(W_dec: Tensor, directions: Tensor) -> float:
    return best_cosines(W_dec.detach().float(), directions.float()).mean().item()


def fraction_recovered(W_dec: Tensor, directions: Tensor, threshold: float = 0.9) -> float:
    return (best_cosines(W_dec.detach().float(), directions.float()) > threshold).float().mean().item()


def with_gradients(planted: PlantedDictionary, batch_size: int, seed: int = 0, n_classes: int = 8):
    """(x, grad) batches: grad is the gradient of a cross-entropy through a fixed readout along 8 planted
    directions, so it varies per token and singles out the latents that matter to the 'downstream' loss."""
    generator = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(len(planted.directions), generator=generator)[:n_classes]
    readout = 3.0 * planted.directions[pick]  # [n_classes, d]
    for x in planted.batches(batch_size, seed):
        labels = torch.randint(0, n_classes, (batch_size,), generator=generator)
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(x @ readout.T, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        yield x.detach(), grad
