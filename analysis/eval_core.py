"""Core SAE metrics on held-out cached activations, and inference budgets (algorithms.md §10.5, §5).

Conventions (Appendix D 9, 14):
- FVU is the pooled ratio sum ||x - x_hat||^2 / sum ||x - mu||^2 with mu the per-dimension mean over the eval set
  (never OAI's "normalised MSE" by mean(x^2), never SAEBench's per-token legacy EV).
- Activations come from the cache's keep mask (special and outlier-norm tokens excluded), so no model pass is needed.
- Signed SAEs (AbsTopK, signed MP): L0 and density count z != 0, L1 uses |z|.
- Budget curves report the *measured* L0 beside the nominal k: compare variants at measured L0.
Shrinkage is the relative reconstruction bias gamma = E||x_hat||^2 / E<x, x_hat> (Gated SAE paper; < 1 means
shrinkage), plus the mean per-token norm ratio ||x_hat|| / ||x||.
"""
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from saes.base import SAE
from training.activation_store import ActivationCache

MIN_EVAL_TOKENS = 64
BUDGET_ARCHITECTURES = {"topk", "gradient_topk", "hierarchical_topk", "matching_pursuit", "matching_pursuit_signed"}


# ---- budgets ------------------------------------------------------------------------------------------------
def supports_budget(sae: SAE) -> bool:
    """True when the inference codes follow a per-token budget k that can be changed after training."""
    if sae.architecture == "abstopk":
        return getattr(sae.cfg, "selection", "") == "per_token"
    return sae.architecture in BUDGET_ARCHITECTURES and hasattr(sae.cfg, "k")


def trained_budget(sae: SAE) -> int:
    return int(getattr(sae.cfg, "k_max", None) or sae.cfg.k)


def inference_budget(sae: SAE) -> int:
    """The k that `encode` uses now (HierarchicalTopK: cfg.k, else k_max)."""
    return int(getattr(sae.cfg, "k", None) or sae.cfg.k_max)


def budget_ks(sae: SAE) -> list[int]:
    """Powers of two up to the trained budget and the budget itself (k_max for HierarchicalTopK, which is only
    defined up to k_max); other variants also at twice their k, to show what running above the trained k costs."""
    top = trained_budget(sae)
    ks = {2**i for i in range(top.bit_length()) if 2**i <= top} | {top}
    if not hasattr(sae.cfg, "k_max") and 2 * top <= sae.cfg.d_sae:
        ks.add(2 * top)
    return sorted(ks)


@contextmanager
def budget(sae: SAE, k: int) -> Iterator[SAE]:
    """An SAE whose `encode` uses budget k: HierarchicalTopK's `with_k` view (same parameters), otherwise the same
    SAE with cfg.k set for the duration of the block (restored on exit, also on error)."""
    if not supports_budget(sae):
        raise ValueError(f"A {sae.architecture!r} SAE has no inference budget k to vary: budget curves need topk, "
                         "hierarchical_topk, abstopk (selection per_token), gradient_topk or matching pursuit.")
    if not 0 < k <= sae.cfg.d_sae:
        raise ValueError(f"Budget k={k} must satisfy 0 < k <= d_sae={sae.cfg.d_sae}.")
    if hasattr(sae, "with_k"):
        yield sae.with_k(k)
        return
    old = sae.cfg.k
    sae.cfg.k = k
    try:
        yield sae
    finally:
        sae.cfg.k = old


# ---- core metrics -------------------------------------------------------------------------------------------
class CoreAccumulator:
    """Streams chunks of (x, codes, x_hat) and gives the pooled core metrics (float64 sums on the CPU)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sq_err = self.sum_x2 = self.cos = self.l1 = self.dot = self.xhat2 = self.norm_ratio = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.float64)  # tokens with L0 = 0, 1, ..., d_sae

    def add(self, x: Tensor, codes: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [n, d_in]; codes: [n, d_sae]."""
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        active = (codes != 0).cpu()  # z != 0: signed codes count too
        self.n += len(x)
        self.sq_err += (x - x_hat).pow(2).sum().item()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum().item()
        self.cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum().item()
        self.l1 += codes.abs().double().sum().item()
        self.dot += (x * x_hat).sum().item()
        self.xhat2 += x_hat.pow(2).sum().item()
        self.norm_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        self.fires += active.sum(0).double()
        self.l0_counts += torch.bincount(active.sum(-1), minlength=len(self.l0_counts)).double()

    @property
    def variance_sum(self) -> float:
        """sum over tokens of ||x - mu||^2."""
        return self.sum_x2 - self.sum_x.pow(2).sum().item() / self.n

    @property
    def mean(self) -> Tensor:
        return (self.sum_x / self.n).float()

    def density(self) -> Tensor:
        """Fraction of tokens each latent fires on: [d_sae]."""
        return (self.fires / self.n).float()

    def metrics(self) -> dict:
        n = self.n
        density = self.density()
        l0 = (self.l0_counts * torch.arange(len(self.l0_counts))).sum().item() / n
        fvu = self.sq_err / self.variance_sum if self.variance_sum > 0 else float("nan")
        return {
            "tokens": n, "mse": self.sq_err / n, "mse_per_dim": self.sq_err / (n * len(self.sum_x)),
            "cosine": self.cos / n, "fvu": fvu, "explained_variance": 1 - fvu, "l0": l0, "l1": self.l1 / n,
            "dead_frac": (density == 0).float().mean().item(), "alive_frac": (density > 0).float().mean().item(),
            "dense_frac_1pct": (density > 0.01).float().mean().item(),
            "dense_frac_10pct": (density > 0.1).float().mean().item(),
            "shrinkage_gamma": self.xhat2 / self.dot if self.dot else float("nan"),
            "norm_ratio": self.norm_ratio / n,
        }


def eval_shards(cache: ActivationCache, holdout: int) -> tuple[list[int], bool]:
    """The shards training held out (training.run.split_shards), and whether they really are held out."""
    from training.run import split_shards

    _, shards, held_out = split_shards(cache, holdout)
    return shards, held_out


def eval_activations(cache: ActivationCache, hook: str, shards: list[int], chunk: int = 4096) -> Iterator[Tensor]:
    """Kept activations of the eval shards in chunks [<= chunk, d_in]."""
    for index in shards:
        yield from cache.shard_tokens(index, hook).split(chunk)


@torch.no_grad()
def core_metrics(sae: SAE, chunks: Iterable[Tensor], ks: list[int] | None = None) -> dict:
    """Core metrics over chunks of activations [n, d_in], plus the same metrics at each budget in `ks`.

    Returns {"metrics", "density" [d_sae], "l0_counts" [d_sae+1], "mean" [d_in], "budget": {k: metrics}}."""
    acc = CoreAccumulator(sae.cfg.d_in, sae.cfg.d_sae)
    per_k = {k: CoreAccumulator(sae.cfg.d_in, sae.cfg.d_sae) for k in ks or []}
    device = sae.W_dec.device
    for x in chunks:
        x = x.to(device)
        codes = sae.encode(x)
        acc.add(x, codes, sae.decode(codes))
        for k, k_acc in per_k.items():
            with budget(sae, k) as view:
                codes = view.encode(x)
                k_acc.add(x, codes, view.decode(codes))
    if acc.n < MIN_EVAL_TOKENS:
        raise ValueError(f"The evaluation set has {acc.n} usable tokens (at least {MIN_EVAL_TOKENS} needed): cache "
                         "more --cache.tokens or hold out more shards (--holdout-shards).")
    return {"metrics": acc.metrics(), "density": acc.density(), "l0_counts": acc.l0_counts, "mean": acc.mean,
            "budget": {k: a.metrics() for k, a in per_k.items()}}


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Pooled FVU of one set of activations [n, d_in] and their reconstructions [n, d_in]."""
    acc = CoreAccumulator(x.shape[-1], 1)
    acc.add(x, torch.zeros(len(x), 1), x_hat)
    return acc.metrics()["fvu"]
