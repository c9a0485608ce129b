"""Core SAE metrics on held-out cached activations, their bootstrap intervals, and inference budgets
(docs/methods.md §10.5, §5).

Conventions (Appendix D 9, 14):
- FVU is the pooled ratio sum ||x - x_hat||^2 / sum ||x - mu||^2 with mu the per-dimension mean over the eval set
  (never OAI's "normalised MSE" by mean(x^2)); explained_variance = 1 - FVU.
- SAEBench's two explained variances are reported beside it, under their own names, for comparison with SAEBench
  tables (sae_bench/evals/core/main.py): `explained_variance_saebench` is its current formula,
  1 - E||x - x_hat||^2 / (E||x||^2 - (E||x||^2 / d)^2) (it subtracts the square of the mean per-dimension second
  moment, not the squared norm of the mean, so it is close to 1 - MSE / E||x||^2), and
  `explained_variance_saebench_legacy` its per-token mean of 1 - ||x - x_hat||^2 / ||x - mu||^2 (mu: the mean of the
  evaluated tokens; SAEBench takes its evaluation batch's mean).
- Special tokens (BOS/EOS) are never evaluated. Outlier-norm tokens (norm > outlier_factor x median, left out of
  training) are kept apart: every metric exists with them (SAEBench has no outlier rule) and without them (the
  tokens the SAE trained on); `fvu_with_outliers` and `fvu_without_outliers` are both reported, and the report
  card's convention says which set the other metrics use, the same set the downstream passes splice at.
- Signed SAEs (AbsTopK, signed MP): L0 and density count z != 0, L1 uses |z|.
- Budget curves report the *measured* L0 beside the nominal k: compare variants at measured L0.
Shrinkage is the relative reconstruction bias gamma = E||x_hat||^2 / E<x, x_hat> (Gated SAE paper; < 1 means
shrinkage), plus the mean per-token norm ratio ||x_hat|| / ||x||.

Uncertainty: sums are kept per context, so a bootstrap over contexts (resampled with replacement, fixed seed)
recomputes every metric on each replicate; the interval is the 2.5 / 97.5 percentile of the replicates.
"""
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from saes.base import SAE
from training.activation_store import ActivationCache

MIN_EVAL_TOKENS = 64
BUDGET_ARCHITECTURES = {"topk", "gradient_topk", "hierarchical_topk", "matching_pursuit", "matching_pursuit_signed"}
N_BOOT = 1000  # bootstrap replicates
BOOT_SEED = 0
LEVEL = 0.95


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


# ---- bootstrap ----------------------------------------------------------------------------------------------
def resample_counts(n_contexts: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Tensor:
    """How often each context is drawn in each bootstrap replicate: [n_boot, n_contexts] float64, rows sum to
    n_contexts (draws with replacement, uniform over contexts, a fixed seed so reports are reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_contexts, (n_boot, n_contexts), generator=generator)
    counts = torch.zeros(n_boot, n_contexts, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def percentile_interval(values: Tensor, level: float = LEVEL) -> list[float | None]:
    """[low, high] percentile interval of bootstrap replicates [n_boot] (NaN replicates ignored)."""
    values = values.double()
    values = values[torch.isfinite(values)]
    if len(values) == 0:
        return [None, None]
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [low, high]


def intervals(metric_fn: Callable[[Tensor], dict[str, Tensor]], n_contexts: int, n_boot: int = N_BOOT,
              seed: int = BOOT_SEED, block: int = 100) -> dict[str, list]:
    """Bootstrap intervals of every metric that `metric_fn(weights [b, n_contexts]) -> {name: [b]}` gives."""
    if n_boot <= 0 or n_contexts == 0:
        return {}
    counts = resample_counts(n_contexts, n_boot, seed)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n_boot, block):  # blocks bound the [b, d_sae] tensors of the density metrics
        for name, values in metric_fn(counts[start:start + block]).items():
            parts.setdefault(name, []).append(values)
    return {name: percentile_interval(torch.cat(values)) for name, values in parts.items()}


# ---- core metrics -------------------------------------------------------------------------------------------
SCALARS = ("n", "sq_err", "sum_x2", "cos", "l1", "dot", "xhat2", "norm_ratio", "l0", "ev_token_all",
           "ev_token_regular")
S = {name: i for i, name in enumerate(SCALARS)}
REGULAR, OUTLIER = 0, 1


class CoreAccumulator:
    """Per-context float64 sums (on the CPU) of what the core metrics need, kept apart for regular and
    outlier-norm tokens: any reweighting of contexts (a bootstrap replicate) and either token set gives its
    metrics without another pass. `means` = (mean of all tokens, mean of regular tokens), each [d_in], are needed
    only for SAEBench's legacy per-token explained variance."""

    def __init__(self, d_in: int, d_sae: int, means: tuple[Tensor, Tensor] | None = None):
        self.d_in, self.d_sae = d_in, d_sae
        self.means = None if means is None else tuple(m.double().cpu() for m in means)
        self.scalars = torch.zeros(2, 0, len(SCALARS), dtype=torch.float64)  # [group, context, stat]
        self.sum_x = torch.zeros(2, 0, d_in, dtype=torch.float64)  # [group, context, d_in]
        self.fires = torch.zeros(2, 0, d_sae, dtype=torch.float64)  # [group, context, d_sae]
        self.l0_counts = torch.zeros(2, d_sae + 1, dtype=torch.float64)  # [group, L0 = 0..d_sae]

    @property
    def n_contexts(self) -> int:
        return self.scalars.shape[1]

    def _grow(self, n: int) -> None:
        extra = n - self.n_contexts
        if extra > 0:
            self.scalars = torch.cat([self.scalars, self.scalars.new_zeros(2, extra, len(SCALARS))], 1)
            self.sum_x = torch.cat([self.sum_x, self.sum_x.new_zeros(2, extra, self.d_in)], 1)
            self.fires = torch.cat([self.fires, self.fires.new_zeros(2, extra, self.d_sae)], 1)

    def add(self, x: Tensor, codes: Tensor, x_hat: Tensor, contexts: Tensor | None = None,
            outlier: Tensor | None = None) -> None:
        """x, x_hat: [n, d_in]; codes: [n, d_sae]; contexts: [n] context index of each token (default all in
        context 0); outlier: [n] bool (default none)."""
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        n = len(x)
        contexts = torch.zeros(n, dtype=torch.long) if contexts is None else contexts.long().cpu()
        group = torch.zeros(n, dtype=torch.long) if outlier is None else outlier.long().cpu()
        active = (codes != 0).cpu()  # z != 0: signed codes count too
        if n == 0:
            return
        self._grow(int(contexts.max()) + 1)
        err = (x - x_hat).pow(2).sum(-1)  # [n]
        x2 = x.pow(2).sum(-1)
        rows = torch.zeros(n, len(SCALARS), dtype=torch.float64)
        rows[:, S["n"]] = 1
        rows[:, S["sq_err"]] = err
        rows[:, S["sum_x2"]] = x2
        rows[:, S["cos"]] = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12)
        rows[:, S["l1"]] = codes.abs().double().sum(-1).cpu()
        rows[:, S["dot"]] = (x * x_hat).sum(-1)
        rows[:, S["xhat2"]] = x_hat.pow(2).sum(-1)
        rows[:, S["norm_ratio"]] = x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
        l0 = active.sum(-1)
        rows[:, S["l0"]] = l0.double()
        if self.means is not None:
            for name, mu in zip(("ev_token_all", "ev_token_regular"), self.means):
                rows[:, S[name]] = 1 - err / (x - mu).pow(2).sum(-1).clamp_min(1e-12)
        else:
            rows[:, S["ev_token_all"]] = rows[:, S["ev_token_regular"]] = float("nan")
        flat = group * self.n_contexts + contexts  # index into [group * context]
        self.scalars.view(-1, len(SCALARS)).index_add_(0, flat, rows)
        self.sum_x.view(-1, self.d_in).index_add_(0, flat, x)
        self.fires.view(-1, self.d_sae).index_add_(0, flat, active.double())
        self.l0_counts.view(-1).index_add_(0, group * (self.d_sae + 1) + l0, torch.ones(n, dtype=torch.float64))

    def _sums(self, weights: Tensor, outliers: bool):
        groups = [REGULAR, OUTLIER] if outliers else [REGULAR]
        weights = weights.double()
        s = sum(weights @ self.scalars[g] for g in groups)  # [b, stats]
        sx = sum(weights @ self.sum_x[g] for g in groups)  # [b, d_in]
        fires = sum(weights @ self.fires[g] for g in groups)  # [b, d_sae]
        return s, sx, fires

    def metric_tensors(self, weights: Tensor, outliers: bool = True) -> dict[str, Tensor]:
        """Every core metric for each row of context weights [b, n_contexts] (ones = the eval set itself): {name:
        [b]}. outliers=False: only the regular tokens (what the SAE trained on)."""
        s, sx, fires = self._sums(weights, outliers)
        n = s[:, S["n"]]
        variance_sum = s[:, S["sum_x2"]] - sx.pow(2).sum(-1) / n  # sum ||x - mu||^2
        fvu = s[:, S["sq_err"]] / variance_sum
        mse = s[:, S["sq_err"]] / n
        second_moment = s[:, S["sum_x2"]] / n  # E||x||^2
        density = fires / n[:, None]
        ev_token = s[:, S["ev_token_all" if outliers else "ev_token_regular"]]
        return {
            "tokens": n, "mse": mse, "mse_per_dim": mse / self.d_in, "cosine": s[:, S["cos"]] / n, "fvu": fvu,
            "explained_variance": 1 - fvu,
            "explained_variance_saebench": 1 - mse / (second_moment - (second_moment / self.d_in).pow(2)),
            "explained_variance_saebench_legacy": ev_token / n,
            "l0": s[:, S["l0"]] / n, "l1": s[:, S["l1"]] / n,
            "dead_frac": (fires == 0).double().mean(-1), "alive_frac": (fires > 0).double().mean(-1),
            "dense_frac_1pct": (density > 0.01).double().mean(-1),
            "dense_frac_10pct": (density > 0.1).double().mean(-1),
            "shrinkage_gamma": s[:, S["xhat2"]] / s[:, S["dot"]], "norm_ratio": s[:, S["norm_ratio"]] / n,
        }

    def metrics(self, outliers: bool = True) -> dict:
        """Point estimates on the whole eval set (floats), with both FVUs and the outlier count."""
        ones = torch.ones(1, self.n_contexts, dtype=torch.float64)
        out = {name: value.item() for name, value in self.metric_tensors(ones, outliers).items()}
        out["tokens"] = int(out["tokens"])
        out |= {f"fvu_{name}": self.metric_tensors(ones, flag)["fvu"].item()
                for name, flag in (("with_outliers", True), ("without_outliers", False))}
        out["outlier_tokens"] = int(self.scalars[OUTLIER, :, S["n"]].sum())
        return out

    def intervals(self, outliers: bool = True, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict[str, list]:
        """Bootstrap intervals over contexts of every metric in `metrics` (tokens and counts excluded)."""
        def fn(weights: Tensor) -> dict[str, Tensor]:
            out = self.metric_tensors(weights, outliers)
            out.pop("tokens")
            out["fvu_with_outliers"] = self.metric_tensors(weights, True)["fvu"]
            out["fvu_without_outliers"] = self.metric_tensors(weights, False)["fvu"]
            return out

        return intervals(fn, self.n_contexts, n_boot, seed)

    def n_tokens(self, outliers: bool = True) -> int:
        groups = [REGULAR, OUTLIER] if outliers else [REGULAR]
        return int(sum(self.scalars[g, :, S["n"]].sum() for g in groups))

    def density(self, outliers: bool = True) -> Tensor:
        """Fraction of tokens each latent fires on: [d_sae]."""
        groups = [REGULAR, OUTLIER] if outliers else [REGULAR]
        fires = sum(self.fires[g].sum(0) for g in groups)
        return (fires / max(self.n_tokens(outliers), 1)).float()

    def l0_histogram(self, outliers: bool = True) -> Tensor:
        """Tokens with L0 = 0, 1, ..., d_sae: [d_sae + 1]."""
        return self.l0_counts.sum(0) if outliers else self.l0_counts[REGULAR].clone()


# ---- eval tokens --------------------------------------------------------------------------------------------
def eval_shards(cache: ActivationCache, holdout: int) -> tuple[list[int], bool]:
    """The shards training held out (training.run.split_shards), and whether they really are held out."""
    from training.run import split_shards

    _, shards, held_out = split_shards(cache, holdout)
    return shards, held_out


def eval_activations(cache: ActivationCache, hook: str, shards: list[int], chunk: int = 4096) -> Iterator[Tensor]:
    """Kept (training) activations of the eval shards in chunks [<= chunk, d_in]."""
    for index in shards:
        yield from cache.shard_tokens(index, hook).split(chunk)


def eval_tokens(cache: ActivationCache, hook: str, shards: list[int], chunk: int = 4096
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Every non-special token of the eval shards in chunks: (x [n, d_in] float32, context index [n] counted
    across the shards, outlier [n] bool: norm above the cache's outlier factor x median norm)."""
    offset = 0
    for index in shards:
        special = cache.read(index, "special").reshape(-1).bool()
        keep = cache.keep_mask(index, hook)  # not special and not outlier
        acts = cache.read(index, f"acts.{hook}")  # [contexts * ctx, d_in]
        rows = torch.nonzero(~special)[:, 0]
        contexts = offset + rows // cache.context_length
        outlier = ~keep[rows]
        for start in range(0, len(rows), chunk):
            r = rows[start:start + chunk]
            yield acts[r].float(), contexts[start:start + chunk], outlier[start:start + chunk]
        offset += len(special) // cache.context_length


def as_token_chunk(chunk) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A plain activation tensor [n, d_in] (one context, no outliers) or an (x, contexts, outlier) triple."""
    if isinstance(chunk, Tensor):
        return chunk, None, None
    return tuple(chunk)  # type: ignore[return-value]


def token_means(chunks: Iterable) -> tuple[Tensor, Tensor]:
    """(mean over all tokens, mean over regular tokens), each [d_in] float64."""
    total = regular = None
    n_all = n_regular = 0
    for chunk in chunks:
        x, _, outlier = as_token_chunk(chunk)
        x = x.double().cpu()
        reg = x if outlier is None else x[~outlier.cpu()]
        total = x.sum(0) if total is None else total + x.sum(0)
        regular = reg.sum(0) if regular is None else regular + reg.sum(0)
        n_all, n_regular = n_all + len(x), n_regular + len(reg)
    if total is None:
        raise ValueError("The evaluation set is empty: cache more --cache.tokens or hold out more shards.")
    return total / max(n_all, 1), regular / max(n_regular, 1)


@torch.no_grad()
def core_metrics(sae: SAE, chunks: Iterable | Callable[[], Iterable], ks: list[int] | None = None, *,
                 outliers: bool = True, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """Core metrics over chunks of activations (tensors [n, d_in], or (x, contexts, outlier) triples as
    `eval_tokens` gives), plus the same metrics at each budget in `ks`. `chunks` is read twice (the first pass
    gives the means SAEBench's legacy explained variance needs): pass a list or a function returning the chunks.
    outliers: whether the headline metrics include outlier-norm tokens (both FVUs are always reported).

    Returns {"metrics", "intervals" (bootstrap over contexts), "density" [d_sae], "l0_counts" [d_sae+1],
    "mean" [d_in] (of the headline token set), "budget": {k: metrics}, "budget_intervals": {k: intervals},
    "accumulator"}."""
    source = chunks if callable(chunks) else (lambda data=list(chunks): data)
    means = token_means(source())
    acc = CoreAccumulator(sae.cfg.d_in, sae.cfg.d_sae, means)
    per_k = {k: CoreAccumulator(sae.cfg.d_in, sae.cfg.d_sae, means) for k in ks or []}
    device = sae.W_dec.device
    for chunk in source():
        x, contexts, outlier = as_token_chunk(chunk)
        x = x.to(device)
        codes = sae.encode(x)
        acc.add(x, codes, sae.decode(codes), contexts, outlier)
        for k, k_acc in per_k.items():
            with budget(sae, k) as view:
                codes = view.encode(x)
                k_acc.add(x, codes, view.decode(codes), contexts, outlier)
    if acc.n_tokens(outliers) < MIN_EVAL_TOKENS:
        raise ValueError(f"The evaluation set has {acc.n_tokens(outliers)} usable tokens (at least "
                         f"{MIN_EVAL_TOKENS} needed): cache more --cache.tokens or hold out more shards "
                         "(--holdout-shards).")
    return {"metrics": acc.metrics(outliers), "intervals": acc.intervals(outliers, n_boot, seed),
            "density": acc.density(outliers), "l0_counts": acc.l0_histogram(outliers),
            "mean": means[0 if outliers else 1].float(),
            "budget": {k: a.metrics(outliers) for k, a in per_k.items()},
            "budget_intervals": {k: a.intervals(outliers, n_boot, seed) for k, a in per_k.items()},
            "accumulator": acc}


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Pooled FVU of one set of activations [n, d_in] and their reconstructions [n, d_in]."""
    acc = CoreAccumulator(x.shape[-1], 1)
    acc.add(x, torch.zeros(len(x), 1), x_hat)
    return acc.metric_tensors(torch.ones(1, 1))["fvu"].item()
