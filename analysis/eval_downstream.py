"""Downstream metrics with the SAE spliced in at its hook (docs/methods.md §10.5, Appendix D 10).

CE_clean, CE_sae (reconstruction, no error term), CE_zero and CE_mean (zero- and mean-ablation of the hook), then
CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), KL score = (KL_zero - KL_sae) / KL_zero with KL from
the clean next-token distribution, and delta LM loss = CE_sae - CE_clean (comparable across layers). The
mean-ablation variants use CE_mean / KL_mean in place of the zero-ablated ones.

Where the SAE and the ablations act, and which positions are scored, is a convention; every result names its own:
- `saebench` (default): SAEBench evals/core `get_recons_loss` as its documented commands run it
  (`--exclude_special_tokens_from_reconstruction`): the SAE reconstruction replaces the hook at every non-special
  token (outlier-norm tokens included: SAEBench has no outlier rule), the zero / mean ablations at every position,
  BOS included; a position is scored unless its input token is special (CE over the ctx - 1 predictions, KL over
  all ctx positions, the last one included).
- `saebench_reconstruct_special`: the same with SAEBench's default flag value, the SAE also at BOS/EOS, where this
  workbench's SAEs never trained.
- `special_masked` (this workbench's earlier default): the SAE and the ablations act only at the tokens the SAE
  trained on (not special, not outlier-norm), the token set of the core metrics without outliers; a position is
  scored when neither its input nor its target is special.
Within one convention every pass is scored on the same mask; a pass shared by two conventions (same mode, same
positions) runs once. Sums are kept per context, so a bootstrap over the contexts gives every metric an interval
(eval_core.intervals).
"""
import torch
from torch import Tensor

from analysis.eval_core import BOOT_SEED, MIN_EVAL_TOKENS, N_BOOT, budget, inference_budget, intervals
from analysis.splice import check_hook, splice
from saes.base import SAE
from training.activation_store import ActivationCache

# name -> (where the SAE acts, where the ablations act, which positions are scored). Positions: "all" (every
# position), "regular" (not special), "trained" (not special, not outlier-norm). Scores: "input" (input token not
# special), "input_and_target" (neither special).
CONVENTION_SPECS = {
    "saebench": ("regular", "all", "input"),
    "saebench_reconstruct_special": ("all", "all", "input"),
    "special_masked": ("trained", "trained", "input_and_target"),
}
CONVENTIONS = {
    "saebench": "SAEBench (--exclude_special_tokens_from_reconstruction): SAE at every non-special token, ablations "
                "at every position (BOS included); positions scored unless their input token is special (KL also at "
                "the last position)",
    "saebench_reconstruct_special": "SAEBench's default flags: SAE and ablations at every position (BOS included); "
                                    "positions scored unless their input token is special",
    "special_masked": "SAE and ablations only at training tokens (not special, not outlier-norm); positions scored "
                      "when neither input nor target is special",
}
DEFAULT_CONVENTION = "saebench"


def check_convention(name: str) -> None:
    if name not in CONVENTIONS:
        raise ValueError(f"Unknown evaluation convention {name!r}: use one of {', '.join(CONVENTIONS)}.")


def eval_contexts(cache: ActivationCache, shards: list[int], max_contexts: int) -> tuple[Tensor, Tensor]:
    """Token ids [contexts, ctx] and special flags [contexts, ctx] of the first `max_contexts` eval contexts."""
    tokens, special = [], []
    for index in shards:
        tokens.append(cache.tokens(index))
        special.append(cache.read(index, "special").bool().reshape(tokens[-1].shape))
        if sum(len(t) for t in tokens) >= max_contexts:
            break
    return torch.cat(tokens)[:max_contexts], torch.cat(special)[:max_contexts]


def context_outliers(cache: ActivationCache, hook: str, shards: list[int], max_contexts: int) -> Tensor:
    """Outlier-norm flags [contexts, ctx] (not special, norm above the cache's factor x median) of the same
    contexts as `eval_contexts`."""
    flags = []
    for index in shards:
        special = cache.read(index, "special").reshape(-1).bool()
        outlier = ~special & ~cache.keep_mask(index, hook)
        flags.append(outlier.reshape(-1, cache.context_length))
        if sum(len(f) for f in flags) >= max_contexts:
            break
    return torch.cat(flags)[:max_contexts]


def loss_mask(special: Tensor) -> Tensor:
    """Positions t whose input t and target t+1 are both regular tokens: [contexts, ctx-1] bool."""
    return ~special[:, :-1] & ~special[:, 1:]


def positions_of(kind: str, special: Tensor, outlier: Tensor) -> Tensor | None:
    """Where a pass replaces the hook: [b, ctx] bool, or None for every position."""
    return {"all": None, "regular": ~special, "trained": ~special & ~outlier}[kind]


def score_masks(kind: str, special: Tensor) -> tuple[Tensor, Tensor]:
    """(CE mask [b, ctx-1] over predictions of token t+1 at t, KL mask [b, ctx])."""
    if kind == "input":
        return ~special[:, :-1], ~special
    ce = loss_mask(special)
    return ce, torch.cat([ce, torch.zeros_like(ce[:, :1])], 1)


def convention_masks(convention: str, special: Tensor, outlier: Tensor | None = None):
    """(where the SAE acts, where the ablations act: [b, ctx] bool or None = everywhere; CE mask [b, ctx-1]; KL mask
    [b, ctx])."""
    check_convention(convention)
    outlier = torch.zeros_like(special) if outlier is None else outlier
    sae_at, ablate_at, scored = CONVENTION_SPECS[convention]
    return (positions_of(sae_at, special, outlier), positions_of(ablate_at, special, outlier),
            *score_masks(scored, special))


def recovered(clean: float, spliced: float, ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); NaN when the ablation does not change the loss."""
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")


def ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den.abs() > 1e-12, num / den, torch.full_like(num, float("nan")))


def check_contexts(model, tokens: Tensor, special: Tensor) -> Tensor:
    """The loss mask, after refusing evaluation sets too small to mean anything or from another tokenizer."""
    if len(tokens) == 0 or tokens.shape[1] < 2:
        raise ValueError("No evaluation contexts of at least 2 tokens: cache more --cache.tokens or hold out more "
                         "shards.")
    if special.shape != tokens.shape:
        raise ValueError(f"special flags {tuple(special.shape)} and tokens {tuple(tokens.shape)} differ: read both "
                         "from the same cache shards (eval_contexts).")
    mask = loss_mask(special)
    if int(mask.sum()) < MIN_EVAL_TOKENS:
        raise ValueError(f"The evaluation contexts give {int(mask.sum())} scored positions (at least "
                         f"{MIN_EVAL_TOKENS} needed): raise --max-contexts or cache more tokens.")
    if int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"The cache holds token ids up to {int(tokens.max())} but the model's vocabulary has "
                         f"{model.cfg.d_vocab}: evaluate with the model the cache was written with.")
    return mask


def pass_scores(logits: Tensor, targets: Tensor, ce_mask: Tensor, kl_mask: Tensor, clean_logp: Tensor | None):
    """Per context: summed next-token NLL over ce_mask [b, ctx-1] and summed KL(clean || this pass) over kl_mask
    [b, ctx], each [b] float64; and this pass's log-probs [b, ctx, vocab]."""
    logp = logits.float().log_softmax(-1)  # [b, ctx, vocab]
    nll = -logp[:, :-1].gather(-1, targets[..., None])[..., 0]  # [b, ctx-1]
    ce = (nll.double() * ce_mask).sum(-1)
    if clean_logp is None:
        return ce, torch.zeros_like(ce), logp
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)  # [b, ctx]
    return ce, (kl.double() * kl_mask).sum(-1), logp


def summarise(w: Tensor, ce: dict, kl: dict, n_ce: Tensor, n_kl: Tensor) -> dict[str, Tensor]:
    """Metrics of one convention for context weights w [b, n_contexts]: {name: [b]}. ce, kl: {pass: [contexts]}
    per-context sums; n_ce, n_kl: [contexts] scored positions."""
    w = w.double()
    CE = {p: (w @ v) / (w @ n_ce) for p, v in ce.items()}
    KL = {p: (w @ v) / (w @ n_kl) for p, v in kl.items() if p != "clean"}
    out = {f"ce_{p}": v for p, v in CE.items()} | {f"kl_{p}": v for p, v in KL.items()}
    out["ce_loss_recovered"] = ratio(CE["zero"] - CE["sae"], CE["zero"] - CE["clean"])
    out["kl_score"] = ratio(KL["zero"] - KL["sae"], KL["zero"])
    out["delta_lm_loss"] = CE["sae"] - CE["clean"]
    if "mean" in CE:
        out["ce_loss_recovered_mean_ablation"] = ratio(CE["mean"] - CE["sae"], CE["mean"] - CE["clean"])
        out["kl_score_mean_ablation"] = ratio(KL["mean"] - KL["sae"], KL["mean"])
    return out


def budget_summary(w: Tensor, ce_k: Tensor, kl_k: Tensor, ce: dict, n_ce: Tensor, n_kl: Tensor) -> dict:
    w = w.double()
    clean, zero, sae = (w @ ce["clean"]) / (w @ n_ce), (w @ ce["zero"]) / (w @ n_ce), (w @ ce_k) / (w @ n_ce)
    return {"ce_sae": sae, "delta_lm_loss": sae - clean, "kl_sae": (w @ kl_k) / (w @ n_kl),
            "ce_loss_recovered": ratio(zero - sae, zero - clean)}


def point(fn, n: int) -> dict:
    return {name: value.item() for name, value in fn(torch.ones(1, n, dtype=torch.float64)).items()}


@torch.no_grad()
def downstream(model, sae: SAE, hook: str, tokens: Tensor, special: Tensor, mean: Tensor | None = None,
               ks: list[int] | None = None, batch_size: int = 8, sae_mode: str = "sae", *,
               outlier: Tensor | None = None, conventions: tuple[str, ...] = tuple(CONVENTIONS),
               n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """CE loss clean / SAE / zero- and (with `mean`) mean-ablated, CE loss recovered, KL score and delta LM loss
    under each convention (the first is the headline: its metrics are also top-level keys); with `ks`, the SAE
    pass again at each budget (first convention). tokens, special, outlier: [contexts, ctx].
    `sae_mode` is the splice of the "SAE" pass: 'sae' (the metric) or a control ('sae_with_error', 'zero')."""
    check_hook(model, hook)
    check_contexts(model, tokens, special)
    for name in conventions:
        check_convention(name)
    outlier = torch.zeros_like(special) if outlier is None else outlier.bool()
    n_ctx = len(tokens)
    device = next(model.parameters()).device
    modes = {"sae": sae_mode, "zero": "zero"} | ({"mean": "mean"} if mean is not None else {})
    ce = {c: {p: torch.zeros(n_ctx, dtype=torch.float64) for p in ["clean", *modes]} for c in conventions}
    kl = {c: {p: torch.zeros(n_ctx, dtype=torch.float64) for p in ["clean", *modes]} for c in conventions}
    n_ce = {c: torch.zeros(n_ctx, dtype=torch.float64) for c in conventions}
    n_kl = {c: torch.zeros(n_ctx, dtype=torch.float64) for c in conventions}
    head = conventions[0]
    # every distinct (pass, positions) forward once; the conventions that share it score it with their own masks
    runs: dict[tuple[str, str], list[str]] = {}
    for c in conventions:
        sae_at, ablate_at, _ = CONVENTION_SPECS[c]
        for name in modes:
            runs.setdefault((name, sae_at if name == "sae" else ablate_at), []).append(c)
    # the SAE pass already is the pass at the SAE's own budget: reuse it rather than run the model again
    same_k = inference_budget(sae) if ks and sae_mode == "sae" else None
    k_ce = {k: torch.zeros(n_ctx, dtype=torch.float64) for k in ks or []}
    k_kl = {k: torch.zeros(n_ctx, dtype=torch.float64) for k in ks or []}
    for start in range(0, n_ctx, batch_size):
        rows = slice(start, start + batch_size)
        batch = tokens[rows].to(device)  # [b, ctx]
        targets = batch[:, 1:]
        sp, out = special[rows].to(device), outlier[rows].to(device)
        scores = {c: score_masks(CONVENTION_SPECS[c][2], sp) for c in conventions}
        logits = model(batch)
        clean_logp = None
        for c in conventions:
            c_ce, _, clean_logp = pass_scores(logits, targets, *scores[c], None)
            ce[c]["clean"][rows] = c_ce.cpu()
            n_ce[c][rows], n_kl[c][rows] = scores[c][0].sum(-1).double().cpu(), scores[c][1].sum(-1).double().cpu()
        del logits
        for (name, kind), users in runs.items():
            with splice(model, hook, modes[name], sae, mean=mean if name == "mean" else None,
                        positions=positions_of(kind, sp, out)):
                logits = model(batch)
            for c in users:
                c_ce, c_kl, _ = pass_scores(logits, targets, *scores[c], clean_logp)
                ce[c][name][rows], kl[c][name][rows] = c_ce.cpu(), c_kl.cpu()
            del logits
        positions = positions_of(CONVENTION_SPECS[head][0], sp, out)
        for k_value in k_ce:
            if k_value == same_k:
                continue
            with budget(sae, k_value) as view, splice(model, hook, "sae", view, positions=positions):
                c_ce, c_kl, _ = pass_scores(model(batch), targets, *scores[head], clean_logp)
            k_ce[k_value][rows], k_kl[k_value][rows] = c_ce.cpu(), c_kl.cpu()
    if same_k in k_ce:
        k_ce[same_k], k_kl[same_k] = ce[head]["sae"], kl[head]["sae"]

    def fn_of(c):
        return lambda w: summarise(w, ce[c], kl[c], n_ce[c], n_kl[c])

    by_convention = {c: point(fn_of(c), n_ctx) | {"scored_positions": int(n_ce[c].sum())} for c in conventions}
    result = {"convention": head, "tokens": int(n_ce[head].sum()), "contexts": n_ctx, **by_convention[head],
              "conventions": by_convention,
              "intervals": {c: intervals(fn_of(c), n_ctx, n_boot, seed) for c in conventions}}

    def k_fn(k):
        return lambda w: budget_summary(w, k_ce[k], k_kl[k], ce[head], n_ce[head], n_kl[head])

    result["budget"] = {k: point(k_fn(k), n_ctx) for k in ks or []}
    result["budget_intervals"] = {k: intervals(k_fn(k), n_ctx, n_boot, seed) for k in ks or []}
    return result
