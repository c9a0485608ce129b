"""Runs page: every run under the runs folder, the selected run's config, training curves, W&B folder, eval
figures and comparisons."""
import json

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st
from plotly.subplots import make_subplots

from analysis.store import Run
from app import common

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
                 "features": "yes" if r.has_features() else "no"})
st.caption(f"{len(paths)} run(s) found under `{root}`.")
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

run = common.require_run()
st.header(common.run_label(str(run.path), root))
summary = run.summary()
cols = st.columns(4)
for col, (name, key, fmt) in zip(cols, [("FVU", "fvu", "{:.4f}"), ("L0", "l0", "{:.2f}"),
                                        ("Never fired", "never_fired_frac", "{:.1%}"),
                                        ("Train tokens", "train_tokens", "{:,}")]):
    col.metric(name, fmt.format(summary[key]) if summary.get(key) is not None else "-")

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

with st.expander("Config"):
    st.json({"train": run.config(), "sae": run.sae_cfg(), "summary": summary}, expanded=False)

metrics = run.metrics()
if metrics:
    st.subheader("Training curves")
    frame = pd.DataFrame(metrics)
    if "sae" in frame.columns and frame["sae"].nunique() > 1:  # multi-SAE metrics file: keep this SAE's rows
        mine = frame[frame["sae"] == run.name]
        frame = mine if len(mine) else frame
    wanted = [c for c in ("loss", "fvu", "l0", "dead_frac", "lr", "tokens_per_s") if c in frame.columns]
    x = frame["step"] if "step" in frame.columns else frame.index
    fig = make_subplots(rows=(len(wanted) + 2) // 3, cols=3, subplot_titles=wanted)
    for i, name in enumerate(wanted):
        fig.add_trace(go.Scatter(x=x, y=frame[name], mode="lines", name=name), row=i // 3 + 1, col=i % 3 + 1)
    fig.update_layout(height=260 * ((len(wanted) + 2) // 3), showlegend=False, margin=dict(t=40, b=20))
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
show_figures(run.comparisons(), "Comparison")
