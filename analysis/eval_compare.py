"""Figures of report cards and the `saewb eval` comparison of several runs (issue 6).

    saewb eval runs/a runs/b --out runs/comparison

writes a report card into each run (RUN/eval/metrics.json, RUN/eval/figures/*.json) and, into `out`, table.md,
table.csv, cards.json, stability.csv (runs differing only in seed) and plotly figures as JSON + HTML: FVU vs L0 (with
the Pareto front), delta LM loss vs L0, dead latents, and budget curves (FVU and delta LM loss vs measured L0) for
variants with k. figures/*.html load plotly.js from its CDN (small files); report.html embeds it once and holds the
table and every figure, so it opens offline. W&B is off by default (the files are the record); --wandb offline/online
logs the table, the per-run numbers and the figures into an eval run, and each run's report card (scalars with
their intervals, figures) into that run's own training W&B run (`log_card_wandb`, by the id in wandb_id.txt).
"""
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from training.logger import WANDB_MODES


# ---- figures ------------------------------------------------------------------------------------------------
def error_bar(value, ci) -> dict | None:
    """Plotly error bars (asymmetric) from bootstrap intervals: ci is [low, high] per point, or None."""
    values = value if isinstance(value, list) else [value]
    cis = ci if isinstance(ci, list) and ci and isinstance(ci[0], (list, type(None))) else [ci]
    if not any(c and None not in c for c in cis):
        return None
    plus = [c[1] - v if c and None not in c and v is not None else 0 for v, c in zip(values, cis)]
    minus = [v - c[0] if c and None not in c and v is not None else 0 for v, c in zip(values, cis)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "visible": True}


def core_ci(card: dict, key: str):
    return card.get("intervals", {}).get("core", {}).get(key)


def down_ci(card: dict, key: str):
    return card.get("intervals", {}).get("downstream", {}).get(key)


def card_figures(card: dict) -> dict:
    """Plotly figures of one card: latent density histogram, per-token L0 histogram, the ZF plot, the supervised-
    dictionary scores (if any), budget curve (if any) with 95% bootstrap error bars."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figures = {}
    dens = card["histograms"]["log10_density"]
    centers = [(a + b) / 2 for a, b in zip(dens["edges"][:-1], dens["edges"][1:])]
    fig = go.Figure(go.Bar(x=centers, y=dens["counts"], name="alive latents"))
    fig.update_layout(title=f"{card['name']}: latent density ({dens['dead']} dead latents not shown)",
                      xaxis_title="log10 fraction of tokens a latent fires on", yaxis_title="latents")
    figures["density_histogram"] = fig
    l0 = card["histograms"]["l0"]
    fig = go.Figure(go.Bar(x=l0["values"], y=l0["counts"]))
    fig.update_layout(title=f"{card['name']}: active latents per token (mean L0 {card['core']['l0']:.2f})",
                      xaxis_title="L0 (latents with z != 0)", yaxis_title="tokens")
    figures["l0_histogram"] = fig
    if card.get("afa"):
        from analysis.afa import zf_figure

        figures["zf"] = zf_figure(card["afa"])
    if card.get("supervised_dictionary"):
        from analysis.supervised_dict import supervised_figure

        figures["supervised_dictionary"] = supervised_figure(card["supervised_dictionary"])
    if card.get("budget"):
        rows = card["budget"]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("FVU vs measured L0", "delta LM loss vs measured L0"))
        text = [f"k={r['k']}" for r in rows]
        x = [r["l0"] for r in rows]
        error_x = error_bar(x, [r.get("ci", {}).get("l0") for r in rows])
        for col, key, name in ((1, "fvu", "FVU"), (2, "delta_lm_loss", "delta LM loss")):
            y = [r[key] for r in rows]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", text=text, name=name, error_x=error_x,
                                     error_y=error_bar(y, [r.get("ci", {}).get(key) for r in rows])), row=1, col=col)
        fig.update_xaxes(type="log", title_text="L0")
        fig.update_layout(title=f"{card['name']}: budget curve (one checkpoint, k varied at inference; "
                                f"{convention_of(card)} convention, 95% bootstrap intervals)")
        figures["budget_curve"] = fig
    return figures


def convention_of(card: dict) -> str:
    return card.get("eval", {}).get("convention") or card.get("downstream", {}).get("convention") or "special_masked"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (lower L0, lower FVU), sorted by L0."""
    front, best = [], float("inf")
    for x, y in sorted(p for p in points if None not in p):
        if y < best:
            front.append((x, y))
            best = y
    return front


def comparison_figures(cards: list[dict], labels: list[str]) -> dict:
    """FVU vs L0 (Pareto front), delta LM loss vs L0, dead latents, budget curves; 95% bootstrap error bars."""
    import plotly.graph_objects as go

    conventions = sorted({convention_of(c) for c in cards})

    def scatter(y_key: str, section: str, title: str, y_title: str, front: bool = False):
        fig = go.Figure()
        for card, label in zip(cards, labels):
            y = card[section].get(y_key)
            y_ci = core_ci(card, y_key) if section == "core" else down_ci(card, y_key)
            fig.add_trace(go.Scatter(x=[card["core"]["l0"]], y=[y], mode="markers", name=label,
                                     text=[card["architecture"]], marker={"size": 10},
                                     error_x=error_bar(card["core"]["l0"], core_ci(card, "l0")),
                                     error_y=error_bar(y, y_ci)))
        if front:
            points = pareto_front([(c["core"]["l0"], c[section].get(y_key)) for c in cards])
            fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines",
                                     name="Pareto front", line={"dash": "dash", "color": "gray"}))
        fig.update_layout(title=title, xaxis_title="L0 (measured)", yaxis_title=y_title)
        return fig

    tag = f"{'/'.join(conventions)} convention; 95% bootstrap intervals over contexts"
    figures = {
        "fvu_vs_l0": scatter("fvu", "core", f"FVU vs L0 (lower-left is better; {tag})", "FVU", front=True),
        "delta_lm_loss_vs_l0": scatter("delta_lm_loss", "downstream", f"delta LM loss vs L0 ({tag})",
                                       "CE_sae - CE_clean"),
    }
    dead = [100 * c["core"]["dead_frac"] for c in cards]
    dead_ci = [[100 * v for v in core_ci(c, "dead_frac")] if core_ci(c, "dead_frac") else None for c in cards]
    fig = go.Figure(go.Bar(x=labels, y=dead, error_y=error_bar(dead, dead_ci)))
    fig.update_layout(title=f"Dead latents (never fired on the eval set; {tag})", yaxis_title="% of latents")
    figures["dead_latents"] = fig
    if any(c.get("budget") for c in cards):
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("FVU vs measured L0", "delta LM loss vs measured L0"))
        for card, label in zip(cards, labels):
            rows = card.get("budget") or []
            if not rows:
                continue
            x = [r["l0"] for r in rows]
            error_x = error_bar(x, [r.get("ci", {}).get("l0") for r in rows])
            for col, key in ((1, "fvu"), (2, "delta_lm_loss")):
                y = [r[key] for r in rows]
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, legendgroup=label,
                                         showlegend=col == 1, error_x=error_x,
                                         error_y=error_bar(y, [r.get("ci", {}).get(key) for r in rows])),
                              row=1, col=col)
        fig.update_xaxes(type="log", title_text="L0")
        fig.update_layout(title=f"Budget curves (k varied at inference on one checkpoint; {tag})")
        figures["budget_curves"] = fig
    return figures


# ---- the comparison table -----------------------------------------------------------------------------------
SAEBENCH, ALL = "downstream:saebench", "downstream:saebench_reconstruct_special"
MASKED = "downstream:special_masked"
COLUMNS = [  # (header, section, key, format); section "downstream:<convention>" reads that convention's results
    ("run", None, "label", "s"), ("architecture", None, "architecture", "s"), ("hook", None, "hook", "s"),
    ("d_sae", None, "d_sae", "d"), ("k", None, "k", "s"), ("convention", None, "convention", "s"),
    ("L0", "core", "l0", ".2f"), ("FVU (with outliers)", "core", "fvu_with_outliers", ".4f"),
    ("FVU (without outliers)", "core", "fvu_without_outliers", ".4f"),
    ("explained variance (1 - FVU)", "core", "explained_variance", ".4f"),
    ("EV (SAEBench)", "core", "explained_variance_saebench", ".4f"),
    ("EV (SAEBench legacy, per token)", "core", "explained_variance_saebench_legacy", ".4f"),
    ("cosine", "core", "cosine", ".4f"), ("MSE", "core", "mse", ".4g"), ("L1", "core", "l1", ".4g"),
    ("dead %", "core", "dead_frac", "%"), ("dense >1% %", "core", "dense_frac_1pct", "%"),
    ("dense >10% %", "core", "dense_frac_10pct", "%"), ("shrinkage gamma", "core", "shrinkage_gamma", ".4f"),
    ("CE clean (SAEBench)", SAEBENCH, "ce_clean", ".4f"), ("CE SAE (SAEBench)", SAEBENCH, "ce_sae", ".4f"),
    ("CE zero (SAEBench)", SAEBENCH, "ce_zero", ".4f"), ("CE mean (SAEBench)", SAEBENCH, "ce_mean", ".4f"),
    ("CE recovered (SAEBench)", SAEBENCH, "ce_loss_recovered", ".4f"),
    ("CE recovered, mean abl. (SAEBench)", SAEBENCH, "ce_loss_recovered_mean_ablation", ".4f"),
    ("KL score (SAEBench)", SAEBENCH, "kl_score", ".4f"),
    ("delta LM loss (SAEBench)", SAEBENCH, "delta_lm_loss", ".4f"),
    ("CE recovered (SAEBench, SAE at special tokens)", ALL, "ce_loss_recovered", ".4f"),
    ("KL score (SAEBench, SAE at special tokens)", ALL, "kl_score", ".4f"),
    ("delta LM loss (SAEBench, SAE at special tokens)", ALL, "delta_lm_loss", ".4f"),
    ("CE recovered (special-masked)", MASKED, "ce_loss_recovered", ".4f"),
    ("CE recovered, mean abl. (special-masked)", MASKED, "ce_loss_recovered_mean_ablation", ".4f"),
    ("KL score (special-masked)", MASKED, "kl_score", ".4f"),
    ("delta LM loss (special-masked)", MASKED, "delta_lm_loss", ".4f"),
]


def column_value(card: dict, section: str | None, key: str):
    """(value, [low, high] bootstrap interval or None) of one table cell."""
    if section is None:
        return (convention_of(card) if key == "convention" else card.get(key)), None
    intervals = card.get("intervals", {})
    if section == "core":
        return card["core"].get(key), intervals.get("core", {}).get(key)
    convention = section.split(":", 1)[1]
    values = card.get("downstream_conventions", {}).get(convention)
    if values is None and convention_of(card) == convention:
        values = card.get("downstream", {})
    ci = intervals.get("downstream_conventions", {}).get(convention, {}).get(key)
    return (values or {}).get(key), ci


def format_cell(value, spec: str) -> str:
    if value is None:
        return ""
    if spec == "%":
        return f"{100 * value:.2f}"
    if spec == "s":
        return str(value)
    return format(value, spec)


def table_rows(cards: list[dict], labels: list[str]) -> list[list[str]]:
    """One row per card; numeric cells read 'value [low, high]' (95% bootstrap interval over contexts)."""
    rows = []
    for card, label in zip(cards, labels):
        row = []
        for _, section, key, spec in COLUMNS:
            value, ci = (label, None) if key == "label" else column_value(card, section, key)
            text = format_cell(value, spec)
            if text and ci and None not in ci:
                text += f" [{format_cell(ci[0], spec)}, {format_cell(ci[1], spec)}]"
            row.append(text)
        rows.append(row)
    return rows


def csv_table(cards: list[dict], labels: list[str]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for table.csv: each numeric column followed by its interval's '<column> low' and
    '<column> high' columns (machine-readable)."""
    headers = []
    for header, section, _, spec in COLUMNS:
        headers.append(header)
        if section is not None:
            headers += [f"{header} low", f"{header} high"]
    rows = []
    for card, label in zip(cards, labels):
        row = []
        for _, section, key, spec in COLUMNS:
            value, ci = (label, None) if key == "label" else column_value(card, section, key)
            row.append(format_cell(value, spec))
            if section is not None:
                ci = ci or [None, None]
                row += [format_cell(ci[0], spec), format_cell(ci[1], spec)]
        rows.append(row)
    return headers, rows


def labels_of(runs: list[Path]) -> list[str]:
    """Run names relative to their common parent (unique, readable)."""
    paths = [Path(r).resolve() for r in runs]
    base = Path(os.path.commonpath([p.parent for p in paths]))
    return [str(p.relative_to(base)) for p in paths]


def default_out(runs: list[Path]) -> Path:
    return Path(os.path.commonpath([Path(r).resolve().parent for r in runs])) / "comparison"


NOTES = ("FVU is pooled (sum ||x - x_hat||^2 / sum ||x - mean||^2) on held-out tokens, special tokens excluded; "
         "'with outliers' counts the outlier-norm tokens training skips, 'without' does not. EV (SAEBench) and EV "
         "(SAEBench legacy, per token) follow SAEBench's formulas (analysis/eval_core.py). The 'convention' column "
         "says which token set the other core metrics use: saebench* = every non-special token, special_masked = "
         "training tokens. CE recovered = (CE_zero - CE_SAE) / (CE_zero - CE_clean) with zero-ablation (the "
         "mean-ablation variant beside it); (SAEBench): ablations at every position, BOS included, the SAE at every "
         "non-special token (SAEBench's --exclude_special_tokens_from_reconstruction), positions scored unless their "
         "input is special; (SAEBench, SAE at special tokens): the SAE at BOS/EOS too (SAEBench's default flag); "
         "(special-masked): SAE and ablations only at training tokens, positions scored when input and target are "
         "regular. Compare across layers with delta LM loss, "
         "variants at measured L0, not nominal k. Brackets: 95% bootstrap intervals over contexts (percentile, "
         "fixed seed).")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell or "n/a" for cell in row) + " |" for row in rows])


def write_comparison(cards: list[dict], out: Path, labels: list[str] | None = None,
                     stability: list[dict] | None = None) -> dict:
    """table.md, table.csv, cards.json, stability.csv (if any pair), figures/<name>.json + .html and a
    self-contained report.html in `out`; returns the figures."""
    import json

    labels = labels or [c["name"] for c in cards]
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    headers = [c[0] for c in COLUMNS]
    rows = table_rows(cards, labels)
    write_csv(out / "table.csv", *csv_table(cards, labels))
    md = markdown_table(headers, rows) + "\n\n" + NOTES + "\n"
    if stability:
        s_headers = ["run a", "run b", "mean matched |cos|", "fraction > threshold", "threshold", "matching"]
        s_rows = [[p["a"], p["b"], f"{p['mean_matched_cosine']:.4f}", f"{p['fraction_matched']:.4f}",
                   str(p["threshold"]), p["matching"]] for p in stability]
        write_csv(out / "stability.csv", s_headers, s_rows)
        md += "\n## Stability across seeds\n\n" + markdown_table(s_headers, s_rows) + "\n"
    (out / "table.md").write_text(md)
    (out / "cards.json").write_text(json.dumps({label: card for label, card in zip(labels, cards)}, indent=2))
    figures = comparison_figures(cards, labels)
    for name, fig in figures.items():
        (out / "figures" / f"{name}.json").write_text(fig.to_json())
        fig.write_html(out / "figures" / f"{name}.html", include_plotlyjs="cdn")
    write_report_html(out / "report.html", headers, rows, figures)
    return figures


def write_csv(path: Path, headers: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def write_report_html(path: Path, headers: list[str], rows: list[list[str]], figures: dict) -> None:
    """One page with the table and every figure; plotly.js is embedded once, so it opens offline."""
    from html import escape

    table = ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures.values())]
    style = ("body{font-family:sans-serif} table{border-collapse:collapse;font-size:12px} "
             "td,th{border:1px solid #ccc;padding:2px 6px}")
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>SAE comparison</title><style>{style}"
                    f"</style></head><body><h1>SAE comparison</h1>{table}<p>{escape(NOTES)}</p>{''.join(parts)}"
                    "</body></html>")


# ---- the command --------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Evaluate trained SAEs: core metrics (FVU, L0, dead/dense latents, shrinkage) on held-out cached tokens,
    downstream CE loss with the SAE spliced in (CE recovered, KL score, delta LM loss), budget curves over k; then
    a comparison table and plots across the runs."""

    runs: tyro.conf.Positional[list[Path]]
    """Run folders written by `saewb train` (a sweep folder stands for all its SAE subfolders)."""
    out: Path | None = None
    """Folder for the comparison (table.md, table.csv, figures); default <common parent of the runs>/comparison."""
    max_contexts: int = 32
    """Held-out contexts for the downstream (CE loss / KL) passes; each pass costs one forward of them."""
    model: str | None = None
    """Model to load instead of the one recorded in each run's config.json."""
    device: str = "cpu"
    """Torch device for the model and SAEs."""
    budget_curve: bool = True
    """Also compute FVU and delta LM loss vs k (variants with an inference budget k)."""
    convention: Literal["saebench", "saebench_reconstruct_special", "special_masked"] = "saebench"
    """Headline convention: 'saebench' (SAEBench with --exclude_special_tokens_from_reconstruction: SAE at every
    non-special token, ablations at every position, BOS included; loss masked by input token; outlier-norm tokens
    counted), 'saebench_reconstruct_special' (the SAE at BOS/EOS too) or 'special_masked' (SAE and ablations only at
    training tokens). All are computed and tabulated; this one fills the card's top-level metrics."""
    bootstrap: int = 1000
    """Bootstrap replicates over contexts for the 95% intervals (fixed seed 0; 0 turns intervals off)."""
    supervised: Literal["ioi"] | None = None
    """Also score each SAE against supervised feature dictionaries of a task (Makelov et al. 2024; 'ioi'):
    sufficiency, necessity and control of the task's attributes (docs/methods.md §10.7). For SAEs at a late layer
    trained on task-like data; about 2 minutes per SAE on SmolLM2 on a 2-core CPU."""
    stability: bool = True
    """Matched-latent stability (decoder |cosine|) of runs that differ only in seed."""
    wandb: str = "off"
    """Weights & Biases: 'off' (default; everything is in the files), 'offline' or 'online'."""
    wandb_project: str = "saewb"
    """W&B project name."""

    def __post_init__(self) -> None:
        if self.max_contexts < 1:
            raise ValueError(f"--max-contexts must be at least 1, got {self.max_contexts}.")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {self.wandb!r}.")
        from analysis.eval_downstream import check_convention

        check_convention(self.convention)
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap must be 0 (no intervals) or more replicates, got {self.bootstrap}.")


def expand_runs(runs: list[Path]) -> list[Path]:
    from analysis.evals import WEIGHTS, check_run_dir, sae_subfolders

    expanded = []
    for run in runs:
        run = Path(run)
        if not (run / WEIGHTS).is_file() and sae_subfolders(run):
            expanded.extend(sae_subfolders(run))
        else:
            check_run_dir(run)
            expanded.append(run)
    return expanded


def run_eval(cfg: EvalConfig, models: dict | None = None) -> list[dict]:
    """Report card per run, then the comparison in cfg.out. `models` maps model names to loaded models (reused)."""
    from analysis.evals import format_report, model_name, report_card

    if cfg.wandb not in WANDB_MODES:
        raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {cfg.wandb!r}.")
    if not cfg.runs:
        raise ValueError("No run folder given: pass one or more folders written by `saewb train`.")
    runs = expand_runs(cfg.runs)
    models = {} if models is None else models
    cards = []
    for run in runs:
        name = cfg.model or model_name(run)
        if name not in models:
            from training.model import load_model

            models[name] = load_model(name, device=cfg.device)
        card = report_card(run, model=models[name], max_contexts=cfg.max_contexts, budget_curve=cfg.budget_curve,
                           device=cfg.device, convention=cfg.convention, n_boot=cfg.bootstrap,
                           supervised=cfg.supervised)
        print(format_report(card))
        cards.append(card)
    out = Path(cfg.out) if cfg.out else default_out(runs)
    labels = labels_of(runs)
    pairs = stability_pairs(runs, cards, labels) if cfg.stability else []
    try:
        figures = write_comparison(cards, out, labels, pairs)
    except OSError as error:  # a full disk: say where, and that the per-run report cards are already written
        raise OSError(f"Could not write the comparison into {out} ({error.strerror or error}): free space there and run "
                      "the same `saewb eval` again (each run's eval/metrics.json is already written).") from None
    print("\n" + short_table(cards, labels))
    for pair in pairs:
        print(f"stability {pair['a']} ~ {pair['b']}: mean matched |cos| {pair['mean_matched_cosine']:.3f}, "
              f"{100 * pair['fraction_matched']:.1f}% > {pair['threshold']} ({pair['matching']} matching)")
    print(f"Comparison of {len(cards)} run(s) written to {out} (table.md, table.csv, report.html, figures/)")
    if cfg.wandb != "off":
        log_wandb(cfg, cards, labels, figures, out)
        for run, card in zip(runs, cards):
            log_card_wandb(run, card, cfg.wandb, cfg.wandb_project)
    return cards


def stability_pairs(runs: list[Path], cards: list[dict], labels: list[str]) -> list[dict]:
    """Matched-latent stability of every pair of runs that differ only in seed (same architecture, hook, d_sae, k)."""
    from analysis.eval_synthetic import run_stability

    pairs = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            a, b = cards[i], cards[j]
            if all(a.get(key) == b.get(key) for key in ("architecture", "hook", "d_sae", "k")):
                pairs.append({"a": labels[i], "b": labels[j]} | run_stability(runs[i], runs[j]))
    return pairs


def short_table(cards: list[dict], labels: list[str]) -> str:
    """The few columns that fit a terminal (downstream columns under each card's headline convention)."""
    headers = ["run", "arch", "convention", "L0", "FVU (w/ outl.)", "FVU (w/o)", "dead %", "CE rec.", "KL score",
               "dLM loss"]
    rows = [[label, c["architecture"], convention_of(c), fmt(c["core"]["l0"], ".1f"),
             fmt(c["core"].get("fvu_with_outliers"), ".4f"), fmt(c["core"].get("fvu_without_outliers"), ".4f"),
             fmt(100 * c["core"]["dead_frac"], ".1f"), fmt(c["downstream"]["ce_loss_recovered"], ".4f"),
             fmt(c["downstream"]["kl_score"], ".4f"), fmt(c["downstream"]["delta_lm_loss"], ".4f")]
            for c, label in zip(cards, labels)]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [headers, *rows])


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def log_wandb(cfg: EvalConfig, cards: list[dict], labels: list[str], figures: dict, out: Path) -> None:
    os.environ["WANDB_MODE"] = cfg.wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=cfg.wandb_project, name=f"eval-{out.parent.name}", dir=str(out), job_type="eval",
                     config={"runs": labels, "max_contexts": cfg.max_contexts}, reinit="finish_previous")
    try:
        headers = [c[0] for c in COLUMNS]
        run.log({"eval/table": wandb.Table(columns=headers, data=table_rows(cards, labels))})
        for label, card in zip(labels, cards):
            run.summary.update({f"{label}/{k}": v for section in ("core", "downstream")
                                for k, v in card[section].items() if isinstance(v, (int, float))})
        run.log({f"eval/{name}": wandb.Html(open(out / "figures" / f"{name}.html").read()) for name in figures})
    finally:
        run.finish()


def card_scalars(card: dict) -> dict:
    """The report card's numbers as flat W&B keys: card/core/<metric>, card/<convention>/<metric> (the headline
    convention as card/downstream/<metric>), each interval as <key>_low and <key>_high."""
    scalars = {}
    intervals = card.get("intervals", {})

    def add(prefix: str, values: dict, cis: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"{prefix}/{key}"] = value
                ci = cis.get(key)
                if ci and None not in ci:
                    scalars[f"{prefix}/{key}_low"], scalars[f"{prefix}/{key}_high"] = ci
    add("card/core", card.get("core", {}), intervals.get("core", {}))
    add("card/downstream", card.get("downstream", {}), intervals.get("downstream", {}))
    for name, values in card.get("downstream_conventions", {}).items():
        add(f"card/{name}", values, intervals.get("downstream_conventions", {}).get(name, {}))
    return scalars


def log_card_wandb(run_dir: Path, card: dict, mode: str, project: str = "saewb") -> str | None:
    """Log a report card (scalars with intervals, its figures) into the run's own training W&B run, resumed by the
    id in wandb_id.txt (the run folder, or the job's folder for one SAE of a sweep; keys then start with the SAE's
    name). Returns the run id, or None when the run has no W&B run (trained with --wandb off, or imported)."""
    from training.logger import read_wandb_id, wandb_init

    run_dir = Path(run_dir)
    job_dir = next((d for d in (run_dir, run_dir.parent) if read_wandb_id(d)), None)
    if mode == "off" or job_dir is None:
        return None
    import wandb

    prefix = "" if job_dir == run_dir else f"{run_dir.name}/"
    scalars = {prefix + k: v for k, v in card_scalars(card).items()}
    run, earlier = wandb_init(mode, project=project, name=job_dir.name, config=None, wandb_dir=job_dir,
                              resume_id=read_wandb_id(job_dir))
    try:
        run.log(scalars | {f"{prefix}card/{name}": wandb.Plotly(figure) for name, figure in card_figures(card).items()})
        run.summary.update(scalars)
        return run.id
    finally:
        from training.logger import finish_wandb

        finish_wandb(run, earlier)
