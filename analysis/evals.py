"""The report card of one run folder (issue 6): core metrics on held-out cached tokens, downstream loss with the SAE
spliced in, a budget curve for variants with an inference budget k, and plotly figures.

    card = report_card("runs/demo")           # writes runs/demo/eval/metrics.json and eval/figures/*.json
    print(format_report(card))

The evaluation set is the run's held-out shards (config.json `holdout_shards`, split as training.run.split_shards
splits them) of the cache recorded in summary.json; the downstream passes use the first `max_contexts` of their
contexts. The card names its convention (card["eval"]["convention"], default SAEBench's: the SAE and the ablations
at every position, outlier-norm tokens counted; eval_downstream.CONVENTIONS), holds the downstream metrics of
both conventions, both FVUs, and a 95% bootstrap interval over contexts for every metric (card["intervals"],
budget rows' "ci"); §10.5. Definitions: analysis/eval_core.py (core, budgets), analysis/eval_downstream.py (CE / KL),
analysis/eval_synthetic.py (planted recovery, stability across seeds); comparisons: analysis/eval_compare.py.
"""
import json
import math
from pathlib import Path

import torch

from analysis.eval_core import (BOOT_SEED, LEVEL, MIN_EVAL_TOKENS, N_BOOT, budget, budget_ks, core_metrics,
                                eval_activations, eval_shards, eval_tokens, fvu, supports_budget, trained_budget)
from analysis.eval_downstream import (CONVENTIONS, DEFAULT_CONVENTION, check_contexts, check_convention,
                                      context_outliers, downstream, eval_contexts, loss_mask, recovered)
from analysis.eval_synthetic import (matched_cosines, planted_benchmark, planted_recovery, run_stability,
                                     stability)
from analysis.features import load_run_sae
from saes.base import SAE
from training.activation_store import ActivationCache, CacheError, write_json_atomic

WEIGHTS = "sae_weights.safetensors"


# ---- run folders --------------------------------------------------------------------------------------------
def sae_subfolders(path: Path) -> list[Path]:
    """SAE folders directly under a sweep's run folder."""
    return sorted(p for p in path.iterdir() if (p / WEIGHTS).is_file()) if path.is_dir() else []


def check_run_dir(run_dir: Path) -> None:
    if (run_dir / WEIGHTS).is_file() and (run_dir / "cfg.json").is_file():
        return
    inner = sae_subfolders(run_dir)
    hint = (f" it is a sweep: evaluate its SAE folders, e.g. {inner[0]}" if inner else
            " point at a run folder written by `saewb train` (it holds cfg.json and sae_weights.safetensors)")
    raise ValueError(f"{run_dir} has no SAE weights:{hint}.")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_config(run_dir: Path) -> dict:
    """The job's config.json: in the run folder, or in its parent for one SAE of a sweep."""
    for folder in (run_dir, run_dir.parent):
        if (folder / "config.json").is_file():
            return read_json(folder / "config.json")
    return {}


def model_name(run_dir: Path, sae: SAE | None = None) -> str:
    """The model a run was trained on: config.json cache.model, else cfg.json model_name, else the embedded one."""
    name = run_config(run_dir).get("cache", {}).get("model")
    if not name:
        name = sae.cfg.model_name if sae is not None else read_json(run_dir / "cfg.json").get("model_name")
    return name or "smollm2"


def run_cache(run_dir: Path, summary: dict, hook: str, sae: SAE) -> ActivationCache:
    if not summary.get("cache"):
        raise ValueError(f"{run_dir}/summary.json records no activation cache (trained with --source model or "
                         "unfinished): train from a cache (`saewb train`, the default --source cache) to evaluate it.")
    try:
        cache = ActivationCache(summary["cache"])
    except CacheError as error:  # it names the file and the fix; say whose cache it is
        raise CacheError(f"{run_dir}'s activation cache is unusable: {error}") from None
    if hook not in cache.hooks:
        raise ValueError(f"The SAE reads hook {hook!r} but the run's cache {cache.path} holds {cache.hooks}: evaluate "
                         "it against a cache of that hook.")
    if cache.d_in(hook) != sae.cfg.d_in:
        raise ValueError(f"The SAE has width d_in={sae.cfg.d_in} but the cache's {hook!r} activations have width "
                         f"{cache.d_in(hook)}: evaluate it against the cache it was trained on.")
    return cache


def check_model(model, sae: SAE, hook: str, tokens: torch.Tensor) -> None:
    """The model has the hook and its activation there has the SAE's width."""
    from analysis.splice import check_hook
    from training.model import stop_layer

    check_hook(model, hook)
    _, cache = model.run_with_cache(tokens[:1].to(next(model.parameters()).device), names_filter=[hook],
                                    stop_at_layer=stop_layer([hook], model.cfg.n_layers))
    act = cache[hook]
    width = act.shape[-1] if act.dim() <= 3 else math.prod(act.shape[2:])
    if width != sae.cfg.d_in:
        raise ValueError(f"The model's {hook!r} activations have width {width} but the SAE has d_in={sae.cfg.d_in}: "
                         "evaluate the SAE with the model it was trained on.")


# ---- the report card ----------------------------------------------------------------------------------------
def histogram(values: torch.Tensor, bins: int, low: float, high: float) -> dict:
    counts = torch.histc(values.float(), bins=bins, min=low, max=high) if len(values) else torch.zeros(bins)
    edges = torch.linspace(low, high, bins + 1)
    return {"edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}


def clean(value):
    """JSON-safe: NaN/inf become None, tensors become lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


AFA_TOKENS = 20_000  # tokens for the ZF relation and ε_LBO

CORE_TOKENS = {True: "every non-special token, outlier-norm tokens included",
               False: "the tokens the SAE trained on (not special, not outlier-norm)"}


@torch.no_grad()
def report_card(run_dir: str | Path, model=None, max_contexts: int = 32, *, budget_curve: bool = True,
                write: bool = True, device: str = "cpu", convention: str = DEFAULT_CONVENTION,
                n_boot: int = N_BOOT, seed: int = BOOT_SEED, supervised: str | None = None) -> dict:
    """Evaluate the SAE of a run folder; writes run_dir/eval/metrics.json and run_dir/eval/figures/*.json.

    `convention` (eval_downstream.CONVENTIONS) is the headline: 'saebench' ablates at every position, splices the
    SAE at every non-special token and counts outlier-norm tokens in the core metrics; 'special_masked' keeps all of
    them to the training tokens. The downstream
    metrics of every convention are in card["downstream_conventions"], both FVUs in card["core"], and a bootstrap
    interval over contexts (n_boot replicates, fixed seed) of every metric in card["intervals"] and budget rows.
    `supervised` (a task, 'ioi') adds the supervised-dictionary scores of docs/methods.md §10.7 for SAEs trained on
    task data."""
    check_convention(convention)
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if max_contexts < 1:
        raise ValueError(f"--max-contexts must be at least 1, got {max_contexts}.")
    config, summary = run_config(run_dir), read_json(run_dir / "summary.json")
    sae = load_run_sae(run_dir, device=device).eval()  # a truncated weights file: one sentence naming it
    hook = sae.cfg.hook_name or summary.get("hook", "")
    cache = run_cache(run_dir, summary, hook, sae)
    shards, held_out = eval_shards(cache, int(config.get("holdout_shards", 1)))
    if model is None:
        from training.model import load_model

        model = load_model(model_name(run_dir, sae), device=device)
    tokens, special = eval_contexts(cache, shards, max_contexts)
    check_contexts(model, tokens, special)
    check_model(model, sae, hook, tokens)
    ks = budget_ks(sae) if budget_curve and supports_budget(sae) else []
    with_outliers = convention.startswith("saebench")  # SAEBench has no outlier rule: its SAE acts on them too
    core = core_metrics(sae, lambda: eval_tokens(cache, hook, shards), ks, outliers=with_outliers, n_boot=n_boot,
                        seed=seed)
    conventions = (convention, *[c for c in CONVENTIONS if c != convention])
    down = downstream(model, sae, hook, tokens, special, mean=core["mean"].to(sae.W_dec.device), ks=ks,
                      outlier=context_outliers(cache, hook, shards, max_contexts), conventions=conventions,
                      n_boot=n_boot, seed=seed)
    budget_rows = [{"k": k, "l0": core["budget"][k]["l0"], "fvu": core["budget"][k]["fvu"],
                    "above_trained_k": k > trained_budget(sae), **down["budget"][k],
                    "ci": {"l0": core["budget_intervals"][k].get("l0"), "fvu": core["budget_intervals"][k].get("fvu"),
                           **down["budget_intervals"][k]}} for k in ks]
    density = core["density"]
    alive = density[density > 0]
    low = math.floor(math.log10(1 / max(core["metrics"]["tokens"], 1)))
    l0_counts = core["l0_counts"]
    top = int(torch.nonzero(l0_counts).max()) if bool(l0_counts.any()) else 0
    scalar = (int, float, type(None))
    card = {
        "run": str(run_dir), "name": run_dir.name, "architecture": sae.architecture, "hook": hook,
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "signed": sae.signed,
        "k": getattr(sae.cfg, "k", None) or getattr(sae.cfg, "k_max", None), "seed": config.get("seed"),
        "model": model_name(run_dir, sae), "train_tokens": summary.get("train_tokens"),
        "eval": {"cache": str(cache.path), "shards": shards,
                 "split": "held-out shards" if held_out else "training data (single-shard cache)",
                 "tokens": core["metrics"]["tokens"], "outlier_tokens": core["metrics"]["outlier_tokens"],
                 "contexts": down["contexts"], "core_contexts": core["accumulator"].n_contexts,
                 "scored_positions": down["tokens"],
                 "convention": convention, "convention_description": CONVENTIONS[convention],
                 "conventions": {c: CONVENTIONS[c] for c in conventions},
                 "core_tokens": CORE_TOKENS[with_outliers] + " (fvu_with_outliers / fvu_without_outliers: both sets)",
                 "splice": "SAE reconstruction without error term",
                 "ablations": "zero (CE loss recovered, KL score) and the mean of the core tokens "
                              "(*_mean_ablation)",
                 "explained_variance": "explained_variance = 1 - pooled FVU; explained_variance_saebench and "
                                       "explained_variance_saebench_legacy follow SAEBench's two formulas",
                 "shrinkage": "gamma = E||x_hat||^2 / E<x, x_hat> (relative reconstruction bias; < 1 is shrinkage); "
                              "norm_ratio = mean ||x_hat|| / ||x||",
                 "bootstrap": {"unit": "context", "replicates": n_boot, "seed": seed, "level": LEVEL,
                               "interval": "percentile"}},
        "core": core["metrics"],
        "downstream": {k: v for k, v in down.items() if isinstance(v, scalar) and k not in ("tokens", "contexts")}
        | {"convention": convention},
        "downstream_conventions": down["conventions"],
        "intervals": {"core": core["intervals"], "downstream": down["intervals"][convention],
                      "downstream_conventions": down["intervals"]},
        "budget": budget_rows,
        "histograms": {
            "l0": {"values": list(range(top + 1)), "counts": [int(c) for c in l0_counts[:top + 1].tolist()]},
            "log10_density": histogram(alive.log10(), 40, low, 0.0) | {"dead": int((density == 0).sum())},
        },
    }
    from analysis.afa import afa_metrics  # the quasi-orthogonality diagnostics of Lee et al. 2025 (§9.2)

    card["afa"] = afa_metrics(sae, eval_tokens(cache, hook, shards), AFA_TOKENS)
    if supervised:
        from analysis.supervised_dict import supervised_scores

        card["supervised_dictionary"] = supervised_scores(run_dir, task=supervised, model=model, device=device)
    card = clean(card)
    if write:
        write_card(card, run_dir / "eval")
    return card


def write_card(card: dict, folder: Path) -> None:
    from analysis.eval_compare import card_figures

    (folder / "figures").mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "metrics.json", card)  # the demo reuses it: never leave it half-written
    for stale in (folder / "figures").glob("*.json"):  # e.g. a budget curve from an earlier evaluation
        stale.unlink()
    try:
        for name, figure in card_figures(card).items():
            (folder / "figures" / f"{name}.json").write_text(figure.to_json())
    except OSError as error:  # a full disk: the card is written; a partial figure is unreadable JSON, skipped
        raise OSError(f"Could not write the report card's figures into {folder / 'figures'} "
                      f"({error.strerror or error}): free space there and run the same `saewb eval` again.") from None


def fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def fmt_ci(value, ci, spec: str = ".4f", scale: float = 1.0) -> str:
    """'value [low, high]' (the bootstrap interval), or just the value when there is none."""
    if value is None:
        return "n/a"
    text = format(scale * value, spec)
    if ci and None not in ci:
        text += f" [{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}]"
    return text


def format_report(card: dict) -> str:
    """A few human-readable lines of a report card (95% bootstrap intervals over contexts in brackets)."""
    c, d, e = card["core"], card["downstream"], card["eval"]
    ci = card.get("intervals", {})
    cc, dc = ci.get("core", {}), ci.get("downstream", {})
    convention = e.get("convention", "special_masked")
    lines = [
        f"{card['name']}: {card['architecture']} at {card['hook']} (d_sae {card['d_sae']}"
        + (f", k {card['k']}" if card.get("k") else "") + f"), {e['tokens']} tokens on {e['split']}"
        + (f" ({e['outlier_tokens']} outlier-norm)" if e.get("outlier_tokens") is not None else ""),
        f"  convention {convention}: {e.get('convention_description', '')}",
        f"  FVU {fmt_ci(c.get('fvu_with_outliers', c['fvu']), cc.get('fvu_with_outliers'))} with outliers, "
        f"{fmt_ci(c.get('fvu_without_outliers', c['fvu']), cc.get('fvu_without_outliers'))} without",
        f"  explained variance {fmt_ci(c.get('explained_variance'), cc.get('explained_variance'))}  SAEBench "
        f"{fmt_ci(c.get('explained_variance_saebench'), cc.get('explained_variance_saebench'))}  SAEBench legacy "
        f"{fmt_ci(c.get('explained_variance_saebench_legacy'), cc.get('explained_variance_saebench_legacy'))}",
        f"  cosine {fmt_ci(c['cosine'], cc.get('cosine'))}  MSE {fmt_ci(c['mse'], cc.get('mse'), '.4g')}  "
        f"L0 {fmt_ci(c['l0'], cc.get('l0'), '.2f')}  L1 {fmt_ci(c['l1'], cc.get('l1'), '.3g')}",
        f"  dead {fmt_ci(c['dead_frac'], cc.get('dead_frac'), '.1f', 100)}%  dense >1% "
        f"{fmt_ci(c['dense_frac_1pct'], cc.get('dense_frac_1pct'), '.1f', 100)}%  >10% "
        f"{fmt_ci(c['dense_frac_10pct'], cc.get('dense_frac_10pct'), '.1f', 100)}%  shrinkage gamma "
        f"{fmt_ci(c['shrinkage_gamma'], cc.get('shrinkage_gamma'), '.3f')}",
        f"  CE clean {fmt(d['ce_clean'])}  SAE {fmt(d['ce_sae'])}  zero-abl {fmt(d['ce_zero'])}  "
        f"mean-abl {fmt(d.get('ce_mean'))}  ({e['scored_positions']} positions, {e['contexts']} contexts)",
    ]
    for name, values in card.get("downstream_conventions", {convention: d}).items():
        vci = ci.get("downstream_conventions", {}).get(name, dc if name == convention else {})
        lines.append(f"  [{name}] CE loss recovered {fmt_ci(values['ce_loss_recovered'], vci.get('ce_loss_recovered'))}"
                     f"  KL score {fmt_ci(values['kl_score'], vci.get('kl_score'))}  "
                     f"delta LM loss {fmt_ci(values['delta_lm_loss'], vci.get('delta_lm_loss'))}")
    if card.get("budget"):
        lines.append("  budget: " + ", ".join(f"k={r['k']}: L0 {fmt(r['l0'], '.1f')} FVU {fmt(r['fvu'], '.3f')} "
                                              f"dLM {fmt(r['delta_lm_loss'], '.3f')}" for r in card["budget"]))
    if card.get("afa"):
        zf, eps = card["afa"]["zf"], card["afa"]["epsilon_lbo"]
        lines.append(f"  quasi-orthogonality (Lee et al.): ZF slope {fmt(zf['slope'], '.3f')}, r "
                     f"{fmt(zf['correlation'], '.3f')}; ε_LBO median {fmt(eps['median'], '.3g')}")
    if sup := card.get("supervised_dictionary"):
        sd, sae = sup["supervised"], sup.get("sae", {})
        control = ", ".join(f"k={k} {fmt(v, '.2f')}" for k, v in sae.get("control", {}).items())
        lines.append(f"  supervised {sup['task']} dictionary (Makelov et al.) at {sup['position_name']}, "
                     f"{sup['n_prompts']} prompts{'' if sup['reliable'] else ' (unreliable: see note)'}: "
                     f"sufficiency {fmt(sd['sufficiency'], '.2f')} vs SAE {fmt(sae.get('sufficiency'), '.2f')}, "
                     f"necessity {fmt(sd['necessity'], '.2f')} vs SAE {fmt(sae.get('necessity'), '.2f')}, "
                     f"IO-edit control {fmt(sd.get('control'), '.2f')} vs SAE {control or 'n/a'} "
                     f"(counterfactual patch {fmt(sup.get('counterfactual_patch_control'), '.2f')})")
    return "\n".join(lines)


__all__ = ["CONVENTIONS", "MIN_EVAL_TOKENS", "budget", "budget_ks", "core_metrics", "downstream", "eval_activations",
           "eval_contexts", "eval_tokens", "format_report", "fvu", "loss_mask", "matched_cosines", "planted_benchmark",
           "planted_recovery", "recovered", "report_card", "run_stability", "stability", "supports_budget"]
