"""Feature page: one latent's label and explanation, top contexts (activation inline, a click shows the whole
stored window), quantile samples, histogram, density against all latents, logit lens, neighbours, your own text
shaded by it; search latents by token, label or explanation, or by a text; a sortable table of every latent.
?latent=N opens a latent directly."""
import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app import common

st.title("Feature browser")
run = common.require_run()
store = common.require_features(run)
d_sae = store.d_sae
latent = common.current_latent(d_sae)
st.session_state["latent"] = latent  # the number box shows the current latent (set before the box is drawn)


def picked_number() -> None:
    common.set_latent(st.session_state["latent"])


@st.cache_data(show_spinner=False, max_entries=4)
def latent_table(folder: str, stamp: float) -> pd.DataFrame:
    """Every latent: id, label, density, max activation, explanation and its detection score (for the table)."""
    feats = common.feature_store(folder, stamp)
    density = feats.column("density").tolist()
    top = feats.column("top_values")[:, 0].nan_to_num(0.0).tolist()
    table = pd.DataFrame({"latent": range(feats.d_sae), "label": feats.labels, "density": density,
                          "max act": top})
    if feats.explained():
        table["explanation"] = [feats.explanation(i) for i in range(feats.d_sae)]
        table["score"] = [feats.explanation_score(i) for i in range(feats.d_sae)]
    return table


def picked_row() -> None:
    rows = st.session_state["latent_table"].selection.rows
    order = st.session_state.get("_table_order")
    if rows and order:
        common.set_latent(order[rows[0]])  # positions in the table as given (a column click sorts the view only)


left, mid, right = st.columns([1, 2, 2])
left.number_input(f"Latent (0..{d_sae - 1})", min_value=0, max_value=d_sae - 1, step=1, key="latent",
                  on_change=picked_number)
common.set_latent(latent)
token_query = mid.text_input("Search latents by token, label or explanation", key="token_query",
                             placeholder="e.g. the, or plural nouns")
text_query = right.text_input("Find the latents of a text", key="text_query", placeholder="a sentence to run")

if token_query.strip():
    query = token_query.strip()
    with mid:
        def text_caption(h: dict) -> str:
            score = f"score {h['score']:.2f}" if h["score"] is not None else ""
            return " ".join(x for x in (score, (h["explanation"] or "")[:60]) if x)

        found = False
        for what, hits, caption in (
                ("top examples centre on", store.search_token(query),
                 lambda h: f"{h['matches']}/{h['of']} top examples, max {h['top_value']:.3g}"),
                ("logit lens promotes", store.search_lens(query),
                 lambda h: f"rank {h['rank']}, logit {h['logit']:.3g}"),
                ("label or explanation contains", store.search_text(query), text_caption)):
            if hits:
                found = True
                st.markdown(f"Latents whose {what} **{common.md(query)}**:")
                with st.container(height=min(40 + 38 * len(hits[:10]), 300), border=False):
                    for h in hits[:10]:
                        common.latent_link(h["latent"], store, caption(h))
        if not found:
            st.caption(f"No latent has {query!r} as its top examples' token, in its logit lens, label or "
                       "explanation.")

if text_query.strip():
    with right:
        try:
            tokens, codes = common.text_latents(run, text_query)
        except ValueError as error:
            st.error(str(error))
        else:
            peak, where = codes.max(0)
            order = [int(i) for i in peak.argsort(descending=True)[:10] if peak[i] > 0]
            st.markdown("Latents firing most on this text:")
            for i in order:
                common.latent_link(i, store, f"max {float(peak[i]):.3g} on {tokens[int(where[i])]!r}")
            values, ids = codes.abs().topk(min(3, d_sae), dim=1)
            with st.expander("Per token"):
                st.dataframe(pd.DataFrame({"token": [repr(t) for t in tokens], "strongest latents": [
                    ", ".join(f"{common.latent_title(store, int(i))} ({float(codes[p, i]):.2f})"
                              for v, i in zip(values[p], ids[p]) if v > 0) for p in range(len(tokens))]}),
                    hide_index=True, width="stretch")

with st.expander("All latents (click a column to sort, a row to open it)"):
    table = latent_table(str(run.path / "features"), common.store_stamp(run))
    if "score" in table:
        st.caption(f"Explanations by {store.explainer_model}, scored by detection (balanced accuracy on held-out "
                   "firing and silent excerpts; 0.5 is chance).")
        first = [r["latent"] for r in store.explained()]  # best score first, explained but unscored next
        chosen = set(first)
        table = table.iloc[first + [i for i in range(d_sae) if i not in chosen]]
    st.session_state["_table_order"] = [int(i) for i in table["latent"]]
    st.dataframe(table, hide_index=True, width="stretch", height=300, key="latent_table", on_select=picked_row,
                 selection_mode="single-row",
                 column_config={"density": st.column_config.NumberColumn(format="%.4f"),
                                "max act": st.column_config.NumberColumn(format="%.3g"),
                                "score": st.column_config.NumberColumn(format="%.2f")})

record = store.latent(latent)
st.header(common.md(common.latent_title(store, latent)))
explanation = store.explanation(latent)
if explanation:
    score = store.explanation_score(latent)
    st.markdown(f"**Explanation** ({common.md(store.explainer_model or 'LLM')}"
                + (f", detection score {score:.2f}" if score is not None else "") + f"): {common.md(explanation)}")
st.caption("Label: the tokens its top contexts centre on ‹…› → the tokens its logit lens promotes.")
links = st.columns([1, 1, 3])
common.latent_link(latent, text=f"Steer with latent {latent}", page="views/steering.py", container=links[0],
                   icon=":material/alt_route:")
common.latent_link(latent, text=f"Shade a text by latent {latent}", page=common.LIVE_PAGE, container=links[1],
                   icon=":material/edit_note:")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Density", f"{record['density']:.3%}")
c2.metric("Mean activation (when firing)", f"{record['mean_act']:.3g}")
c3.metric("Fired on (tokens)", f"{record['fired']:,}", help=f"of {record['n_tokens']:,} cached tokens "
          "(special and outlier tokens left out)")
top_max = record["top"][0]["value"] if record["top"] else None
c4.metric("Max activation", f"{top_max:.3g}" if top_max else "-")
stated = run.source_log10_density()
if stated is not None and latent < len(stated):
    st.caption(f"The SAE's source states a density of {10 ** float(stated[latent]):.3%} for this latent "
               "(its sparsity.safetensors, measured on its own training data).")
if not record["top"]:
    st.warning("This latent never fired on the cached tokens (dead).")

heads_run = str(store.index.get("hook", "")).endswith("attn.hook_z")  # the Heads tab: hook_z runs only
tabs = st.tabs(["Top contexts", "Quantile samples", "Histogram", "Density", "Logit lens", "Neighbours",
                "Try your own text"] + (["Heads"] if heads_run else []))
tab_top, tab_q, tab_hist, tab_density, tab_lens, tab_nb, tab_try = tabs[:7]
with tab_top:
    st.caption("Activation, then the context around the token (underlined); click a line for the whole stored "
               f"window ({store.index['left']} tokens before, {store.index['right']} after).")
    st.markdown(common.contexts(record["top"], top_max), unsafe_allow_html=True)
    if record["signed"]:
        st.subheader("Most negative contexts")
        neg = record["bottom"]
        scale_n = abs(neg[0]["value"]) if neg else None
        st.markdown(common.contexts(neg, scale_n) or "None.", unsafe_allow_html=True)
with tab_q:
    groups = store.quantile_samples(record)
    if not groups:
        st.caption("No samples (the latent never fired).")
    else:
        st.caption(f"{len(record['samples'])} random firing tokens, sorted by activation and split into quantiles "
                   "(shaded on the scale of the top activation).")
    for name, examples in groups:
        st.markdown(f"**Quantile {name}** (activations {examples[0]['value']:.3g}..{examples[-1]['value']:.3g})")
        st.markdown(common.contexts(examples, top_max), unsafe_allow_html=True)
with tab_hist:
    edges = record["hist"]["edges"]
    counts = record["hist"]["counts"]
    neg_counts = record["hist"]["neg_counts"] or [0] * len(counts)
    used = [i for i, (a, b) in enumerate(zip(counts, neg_counts)) if a or b]
    if not used:
        st.caption("No activations to show (the latent never fired).")
    else:
        lo, hi = max(used[0] - 1, 0), min(used[-1] + 2, len(counts))  # one empty bin either side
        centres = [(a * b) ** 0.5 for a, b in zip(edges[lo:hi], edges[lo + 1:hi + 1])]
        widths = [b - a for a, b in zip(edges[lo:hi], edges[lo + 1:hi + 1])]
        fig = go.Figure(go.Bar(x=centres, y=counts[lo:hi], name="positive", width=widths))
        if record["hist"]["neg_counts"]:
            fig.add_trace(go.Bar(x=centres, y=neg_counts[lo:hi], name="negative (|z|)", width=widths))
        if top_max:
            fig.add_vline(x=top_max, line_dash="dot", annotation_text="max", line_color="#c00")
        fig.update_xaxes(type="log", title="activation (log bins)",
                         range=[math.log10(edges[lo]), math.log10(edges[hi])])
        fig.update_yaxes(title="tokens")
        fig.update_layout(height=320, margin=dict(t=20, b=20), bargap=0)
        st.plotly_chart(fig, width="stretch", key="hist_chart")
with tab_density:
    density = store.column("density")
    alive = density[density > 0]
    if len(alive) == 0:
        st.caption("No latent fired.")
    else:
        logs = alive.log10()
        fig = go.Figure(go.Histogram(x=logs.tolist(), nbinsx=60, name="all latents", marker_color="#8aa"))
        mine = record["density"]
        if mine > 0:
            fig.add_vline(x=math.log10(mine), line_color="#c00", line_width=3,
                          annotation_text=f"#{latent}: {mine:.3%}")
            share = float((alive < mine).float().mean())
            st.caption(f"Latent {latent} fires on {mine:.3%} of tokens: denser than {share:.0%} of the "
                       f"{len(alive):,} latents that fire; {d_sae - len(alive):,} never fired (not shown).")
        else:
            st.caption(f"Latent {latent} never fired; {len(alive):,} latents did.")
        fig.update_xaxes(title="log10 density (fraction of tokens where the latent fires)")
        fig.update_yaxes(title="latents")
        fig.update_layout(height=320, margin=dict(t=30, b=20), showlegend=False)
        st.plotly_chart(fig, width="stretch", key="density_chart")
with tab_lens:
    st.caption(record["logit_lens_note"])
    if "logit_lens" in record:
        lens = record["logit_lens"]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("Promoted tokens", "Suppressed tokens"),
                            horizontal_spacing=0.25)
        for col, (rows, colour) in enumerate(((lens["top"], "#2a8"), (lens["bottom"], "#d55")), start=1):
            fig.add_trace(go.Bar(x=[v for _, v in rows][::-1], y=[f"{i + 1}. {t!r}" for i, (t, _) in
                                                                   enumerate(rows)][::-1],
                                 orientation="h", marker_color=colour, showlegend=False), row=1, col=col)
        fig.update_xaxes(title="logit per unit of code")
        fig.update_layout(height=40 + 26 * max(len(lens["top"]), 1), margin=dict(t=30, b=20, l=10, r=10))
        st.plotly_chart(fig, width="stretch", key="lens_chart")
with tab_nb:
    st.markdown("Nearest latents by decoder cosine similarity:")
    for n in record["neighbours"]:
        common.latent_link(n["latent"], store, f"cos {n['cos']:.3f}")
with tab_try:
    text = st.text_area("Your text", key="feature_text", height=90,
                        placeholder=f"Type a text and press Ctrl+Enter: it is shaded by latent {latent}")
    if text.strip():
        try:
            tokens, codes = common.text_latents(run, text)
        except ValueError as error:
            st.error(str(error))
        else:
            acts = codes[:, latent].tolist()
            flags = common.flagged(acts, top_max)
            titles = [f"{t!r}: {a:.3f}" for t, a in zip(tokens, acts)]
            st.markdown(common.highlight(tokens, acts, top_max, titles=titles, flags=flags), unsafe_allow_html=True)
            peak = max(acts, default=0.0)
            st.caption(f"Latent {latent} on your text: max {peak:.3g}" + (
                f" ({peak / top_max:.2g}× its largest top-context activation {top_max:.3g})" if top_max else "")
                + f", fires on {sum(a != 0 for a in acts)} of {len(acts)} tokens. Full colour = its top "
                "activation.")
            if flags:
                st.warning("Far above its top contexts (> "
                           f"{common.FLAG_RATIO:g}× {top_max:.3g}), boxed in red: "
                           + ", ".join(f"token {p} {tokens[p]!r} ({acts[p]:.3g})" for p in sorted(flags))
                           + ". The feature store leaves out special and outlier-norm tokens (often the first one), "
                           "so such activations are outside what its contexts show.")
if heads_run:  # direct feature attribution by head and source token (analysis/attn_dfa.py, docs/methods.md §10.6)
    from analysis.attn_dfa import context_dfa, context_tokens, heads_figures

    with tabs[7]:
        top = record["top"]
        if not top:
            st.caption("No top context to attribute: the latent never fired.")
        else:
            pick = st.selectbox("Top context", range(len(top)), key="heads_context", format_func=lambda i: (
                f"#{i + 1}: {top[i]['value']:.3g} on {top[i]['tokens'][top[i]['centre']]!r}"))
            example = top[pick]
            ids, whole = context_tokens(store.index.get("cache"), example["row"], example["token_ids"],
                                        example["centre"])
            model, sae = common.model_and_sae(store.index["model"], str(run.path))
            result = context_dfa(model, sae, store.index["hook"], ids, latent)
            st.caption(f"Latent {latent}'s pre-activation {result['pre_act']:.4g} at the centre token = per-head "
                       f"parts {float(result['heads'].sum()):.4g} + bias {result['bias']:.4g} (b_enc - w.b_dec); "
                       f"activation {result['code']:.4g}, stored {example['value']:.4g}. Each head's part splits "
                       "over source tokens through its attention pattern. " + (
                           "Recomputed on the whole cached context." if whole else
                           "Recomputed on the stored window only (the cache is not readable here), so the "
                           "numbers can differ from the stored activation."))
            bar, heat = heads_figures(result)
            st.plotly_chart(bar, width="stretch")
            st.plotly_chart(heat, width="stretch")
