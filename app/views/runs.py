"""Runs page: every run under the runs folder; the selected run's report card (with its 95% intervals), config as a
table, training curves, W&B folder, eval figures, and the comparison `saewb eval` wrote (its table and figures)."""
import csv
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st
from plotly.subplots import make_subplots

from analysis.store import Run, read_json
from app import common

CURVES = {  # metrics.jsonl column -> y-axis title
    "loss": "training loss", "fvu": "FVU (batch)", "l0": "L0 (latents per token)", "dead_frac": "dead fraction",
    "lr": "learning rate", "tokens_per_s": "tokens per second"}
CARD = [  # (label, section, key, format, scale): the report card's headline numbers
    ("FVU (with outliers)", "core", "fvu_with_outliers", ".4f", 1), ("FVU (without outliers)", "core",
                                                                      "fvu_without_outliers", ".4f", 1),
    ("L0", "core", "l0", ".2f", 1), ("Dead latents (%)", "core", "dead_frac", ".2f", 100),
    ("Dense >1% (%)", "core", "dense_frac_1pct", ".2f", 100), ("Dense >10% (%)", "core", "dense_frac_10pct", ".2f", 100),
    ("CE loss recovered", "downstream", "ce_loss_recovered", ".4f", 1), ("KL score", "downstream", "kl_score", ".4f", 1),
    ("ΔLM loss", "downstream", "delta_lm_loss", ".4f", 1), ("Cosine", "core", "cosine", ".4f", 1)]


def fmt(value, spec: str, scale: float = 1) -> str:
    return "-" if value is None else format(scale * value, spec)


def interval(ci, spec: str, scale: float = 1) -> str:
    return f"95% interval [{fmt(ci[0], spec, scale)}, {fmt(ci[1], spec, scale)}]" if ci and None not in ci else ""


def flatten(value, prefix: str = "") -> list[dict]:
    """A nested config as rows of (setting, value), nested keys joined by dots."""
    if isinstance(value, dict) and value:
        return [row for key, inner in value.items() for row in flatten(inner, f"{prefix}{key}.")]
    shown = value if isinstance(value, str) else json.dumps(value)
    return [{"setting": prefix.rstrip("."), "value": shown}]


def show_report_card(card: dict) -> None:
    """The headline metrics with their bootstrap intervals, and every convention's downstream numbers."""
    st.subheader("Report card")
    e = card.get("eval", {})
    intervals = card.get("intervals", {})
    tokens = e.get("tokens")
    st.caption((f"{tokens:,} tokens" if isinstance(tokens, int) else "Tokens")
               + f" on {e.get('split', '?')}, downstream on {e.get('contexts', '?')} "
               f"contexts; convention {e.get('convention', card.get('downstream', {}).get('convention', '?'))}. "
               "Intervals: 95% bootstrap over contexts (written by `saewb eval` / `saewb demo`).")
    for begin in range(0, len(CARD), 5):
        for column, (label, section, key, spec, scale) in zip(st.columns(5), CARD[begin:begin + 5]):
            value = card.get(section, {}).get(key)
            if value is None and key.startswith("fvu_"):
                value = card.get("core", {}).get("fvu")
            ci = intervals.get(section, {}).get(key)
            column.metric(label, fmt(value, spec, scale), help=interval(ci, spec, scale) or None)
            column.caption(interval(ci, spec, scale) or "no interval")
    rows = []
    for name, values in card.get("downstream_conventions", {}).items():
        cis = intervals.get("downstream_conventions", {}).get(name, {})
        row = {"convention": name}
        for key, title in (("ce_loss_recovered", "CE loss recovered"), ("kl_score", "KL score"),
                           ("delta_lm_loss", "ΔLM loss"), ("ce_clean", "CE clean"), ("ce_sae", "CE with SAE")):
            ci = cis.get(key)
            row[title] = fmt(values.get(key), ".4f") + (f" [{fmt(ci[0], '.4f')}, {fmt(ci[1], '.4f')}]"
                                                        if ci and None not in ci else "")
        rows.append(row)
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def comparison_folders(run: Run) -> list[Path]:
    """Folders `saewb eval` wrote a comparison into, next to this run or its job (those holding table.csv)."""
    found = []
    for folder in (run.path, run.path.parent):
        candidate = folder / "comparison"
        if (candidate / "table.csv").is_file() and candidate not in found:
            found.append(candidate)
    return found


def comparison_table(path: Path) -> pd.DataFrame:
    """table.csv with each '<column> low' / '<column> high' pair folded into its column as 'value [low, high]',
    one column per run (metrics as rows)."""
    with open(path, newline="") as handle:
        records = list(csv.DictReader(handle))
    if not records:
        return pd.DataFrame()
    headers = [h for h in records[0] if not (h.endswith(" low") or h.endswith(" high"))]
    columns = {}
    for record in records:
        cells = {}
        for header in headers:
            text = record.get(header, "")
            low, high = record.get(f"{header} low", ""), record.get(f"{header} high", "")
            cells[header] = f"{text} [{low}, {high}]" if text and low and high else text
        columns[cells.pop("run") or "run"] = cells
    return pd.DataFrame(columns)


def show_comparison(folder: Path, root: Path) -> None:
    st.subheader(f"Comparison: {common.run_label(str(folder), root)}")
    st.caption("Written by `saewb eval` (table.md, table.csv, report.html, figures/). Brackets: 95% bootstrap "
               "intervals over contexts; % columns are percentages.")
    table = comparison_table(folder / "table.csv")
    if not table.empty:
        st.dataframe(table, width="stretch")
    stability = folder / "stability.csv"
    if stability.is_file():
        st.markdown("**Stability across seeds**")
        st.dataframe(pd.read_csv(stability, dtype=str, keep_default_na=False), hide_index=True, width="stretch")
    md = folder / "table.md"
    if md.is_file():
        notes = md.read_text().split("\n\n")
        if len(notes) > 1 and not notes[1].startswith(("|", "#")):
            with st.expander("How the columns are defined"):
                st.caption(notes[1])
    for path in sorted((folder / "figures").glob("*.json")):
        data = read_json(path)
        if isinstance(data, dict) and "data" in data:
            try:
                st.plotly_chart(pio.from_json(json.dumps(data)), width="stretch", key=f"comparison-{folder}-{path.stem}")
            except ValueError:
                st.caption(f"{path.name}: not a readable plotly figure.")


st.title("Runs")
root = common.runs_dir()
paths = common.cached_runs(str(root))
if not paths:
    st.info(f"No runs under `{root}`: train one with `saewb train` or `saewb demo`, then reload.")
    st.stop()

rows = []
for path in paths:
    r = Run(path)
    summary, cfg = r.summary(), r.sae_cfg()
    rows.append({"run": common.run_label(path, root), "architecture": cfg.get("architecture"),
                 "hook": summary.get("hook"), "d_sae": cfg.get("d_sae"), "k": cfg.get("k"),
                 "FVU": summary.get("fvu"), "L0": summary.get("l0"), "steps": summary.get("steps"),
                 "report card": "yes" if (r.path / "eval" / "metrics.json").is_file() else "no",
                 "features": "yes" if r.has_features() else "no"})
st.caption(f"{len(paths)} run(s) found under `{root}`.")
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

run = common.require_run()
st.header(common.run_label(str(run.path), root))
summary = run.summary()
cols = st.columns(4)
for col, (name, key, spec) in zip(cols, [("FVU", "fvu", "{:.4f}"), ("L0", "l0", "{:.2f}"),
                                         ("Never fired", "never_fired_frac", "{:.1%}"),
                                         ("Train tokens", "train_tokens", "{:,}")]):
    col.metric(name, spec.format(summary[key]) if summary.get(key) is not None else "-")
st.caption(f"At the end of training, on {summary.get('eval_split', 'the evaluation shards')}"
           + (f" ({summary['eval_tokens']:,} tokens)." if summary.get("eval_tokens") else "."))

imported = run.imported()
if imported:
    facts = imported.get("facts", {})
    st.info(f"Imported with `saewb import` from `{imported.get('source')}` ({facts.get('layout')} layout); the import "
            f"check measured FVU {imported['fingerprint']['fvu']:.3f} and L0 {imported['fingerprint']['l0']:.1f} on "
            f"{imported['fingerprint']['tokens']:,} tokens" + (f" (source states L0 {facts['l0']})." if facts.get("l0")
                                                              else "."))
wandb = run.wandb_dir()
if wandb:
    st.markdown(f"W&B (offline) folder: `{wandb}` — sync it with `wandb sync {wandb}/offline-run-*`.")
if not run.has_features():
    st.info(f"No feature store yet: run `saewb features {run.path}` to browse latents.")

card = read_json(run.path / "eval" / "metrics.json")
if isinstance(card, dict) and "core" in card:
    show_report_card(card)
else:
    st.caption(f"No report card yet: run `saewb eval {run.path}` (FVU, CE loss recovered, KL score, ΔLM loss, dead "
               "and dense latents, with 95% intervals).")

with st.expander("Config"):
    tabs = st.tabs(["Training job (config.json)", "SAE (cfg.json)", "Summary (summary.json)", "Raw JSON"])
    for tab, data in zip(tabs[:3], (run.config(), run.sae_cfg(), summary)):
        with tab:
            if data:
                st.dataframe(pd.DataFrame(flatten(data)), hide_index=True, width="stretch")
            else:
                st.caption("Not written for this run.")
    with tabs[3]:
        st.json({"train": run.config(), "sae": run.sae_cfg(), "summary": summary}, expanded=False)

metrics = run.metrics()
if metrics:
    st.subheader("Training curves")
    frame = pd.DataFrame(metrics)
    if "sae" in frame.columns and frame["sae"].nunique() > 1:  # multi-SAE metrics file: keep this SAE's rows
        mine = frame[frame["sae"] == run.name]
        frame = mine if len(mine) else frame
    wanted = [c for c in CURVES if c in frame.columns]
    x = frame["step"] if "step" in frame.columns else frame.index
    n_rows = (len(wanted) + 2) // 3
    fig = make_subplots(rows=n_rows, cols=3, subplot_titles=wanted, vertical_spacing=0.5 / max(n_rows, 1))
    for i, name in enumerate(wanted):
        row, col = i // 3 + 1, i % 3 + 1
        fig.add_trace(go.Scatter(x=x, y=frame[name], mode="lines", name=name), row=row, col=col)
        fig.update_xaxes(title_text="step", row=row, col=col)
        fig.update_yaxes(title_text=CURVES[name], row=row, col=col)
    fig.update_layout(height=300 * n_rows, showlegend=False, margin=dict(t=40, b=20))
    st.plotly_chart(fig, width="stretch")
else:
    st.caption("No metrics.jsonl for this run.")


def show_figures(figures: dict, title: str) -> None:
    if not figures:
        return
    st.subheader(title)
    for name, data in figures.items():
        if "data" in data:
            try:
                st.plotly_chart(pio.from_json(json.dumps(data)), width="stretch", key=f"{title}-{name}")
                continue
            except ValueError:
                pass
        st.markdown(f"**{name}**")
        st.json(data, expanded=False)


show_figures(run.eval_figures(), "Evaluation")
for folder in comparison_folders(run):
    show_comparison(folder, root)
