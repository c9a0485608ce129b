"""Feature page: one latent's top contexts, quantile samples, histogram, logit lens, neighbours and density;
search latents by token or by free text. ?latent=N opens a latent directly."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import common

st.title("Feature browser")
run = common.require_run()
store = common.require_features(run)
d_sae = store.d_sae

try:
    start = int(st.query_params.get("latent", 0))
except ValueError:
    start = 0
start = min(max(start, 0), d_sae - 1)
if "latent" not in st.session_state or st.session_state.get("_latent_param") != start:
    st.session_state["latent"] = start
    st.session_state["_latent_param"] = start

left, mid, right = st.columns([1, 2, 2])
latent = int(left.number_input(f"Latent (0..{d_sae - 1})", min_value=0, max_value=d_sae - 1, step=1, key="latent"))
if st.query_params.get("latent") != str(latent):
    st.query_params["latent"] = str(latent)
    st.session_state["_latent_param"] = latent

token_query = mid.text_input("Search latents by token", key="token_query", placeholder="e.g. the")
text_query = right.text_input("Search latents in free text", key="text_query", placeholder="a sentence to run")

if token_query:
    hits = store.search_token(token_query)
    with mid:
        if hits:
            st.markdown(f"Latents whose top examples centre on **{token_query.strip()}**:")
            st.markdown("\n".join(f"- {common.feature_link(h['latent'])}: {h['matches']}/{h['of']} top examples, "
                                  f"max {h['top_value']:.3g}" for h in hits))
        else:
            st.caption(f"No latent has its top examples on the token {token_query.strip()!r}.")
        lens_hits = store.search_lens(token_query)
        if lens_hits:
            st.markdown(f"Latents whose logit lens promotes **{token_query.strip()}**:")
            st.markdown("\n".join(f"- {common.feature_link(h['latent'])}: rank {h['rank']}, logit {h['logit']:.3g}"
                                   for h in lens_hits[:10]))

if text_query:
    with right:
        try:
            tokens, codes = common.text_latents(run, text_query)
        except ValueError as error:
            st.error(str(error))
        else:
            values, ids = codes.abs().topk(min(3, d_sae), dim=1)
            lines = []
            for pos, tok in enumerate(tokens):
                found = [common.feature_link(int(i), f"#{int(i)} ({float(codes[pos, i]):.2f})")
                         for v, i in zip(values[pos], ids[pos]) if v > 0]
                lines.append(f"- `{tok!r}`: " + (", ".join(found) if found else "none"))
            st.markdown("\n".join(lines))

record = store.latent(latent)
st.header(f"Latent {latent}")
st.markdown(f"[Steer the model with latent {latent}](steering?latent={latent})")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Density", f"{record['density']:.3%}")
c2.metric("Mean activation (when firing)", f"{record['mean_act']:.3g}")
c3.metric("Fired on (tokens)", f"{record['fired']:,}", help=f"of {record['n_tokens']:,} cached tokens "
          "(special and outlier tokens left out)")
c4.metric("Max activation", f"{record['top'][0]['value']:.3g}" if record["top"] else "-")
stated = run.source_log10_density()
if stated is not None and latent < len(stated):
    st.caption(f"The SAE's source states a density of {10 ** float(stated[latent]):.3%} for this latent "
               "(its sparsity.safetensors, measured on its own training data).")
if not record["top"]:
    st.warning("This latent never fired on the cached tokens (dead).")

heads_run = str(store.index.get("hook", "")).endswith("attn.hook_z")  # the Heads tab: hook_z runs only
tabs = st.tabs(["Top contexts", "Quantile samples", "Histogram", "Logit lens", "Neighbours"]
               + (["Heads"] if heads_run else []))
tab_top, tab_q, tab_hist, tab_lens, tab_nb = tabs[:5]
with tab_top:
    scale = record["top"][0]["value"] if record["top"] else None
    st.markdown("".join(common.highlight(e["tokens"], e["acts"], scale, e["centre"]) for e in record["top"]),
                unsafe_allow_html=True)
    if record["signed"]:
        st.subheader("Most negative contexts")
        neg = record["bottom"]
        scale_n = abs(neg[0]["value"]) if neg else None
        st.markdown("".join(common.highlight(e["tokens"], e["acts"], scale_n, e["centre"]) for e in neg)
                    or "None.", unsafe_allow_html=True)
with tab_q:
    scale = record["top"][0]["value"] if record["top"] else None
    groups = store.quantile_samples(record)
    if not groups:
        st.caption("No samples (the latent never fired).")
    for name, examples in groups:
        st.markdown(f"**Quantile {name}** of a random sample of firing tokens "
                    f"(activations {examples[0]['value']:.3g}..{examples[-1]['value']:.3g})")
        st.markdown("".join(common.highlight(e["tokens"], e["acts"], scale, e["centre"]) for e in examples),
                    unsafe_allow_html=True)
with tab_hist:
    edges = record["hist"]["edges"]
    centres = [(a * b) ** 0.5 for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=centres, y=record["hist"]["counts"], name="positive", width=[b - a for a, b in
                                                                                             zip(edges[:-1], edges[1:])]))
    if record["hist"]["neg_counts"]:
        fig.add_trace(go.Bar(x=centres, y=record["hist"]["neg_counts"], name="negative (|z|)"))
    fig.update_xaxes(type="log", title="activation (log bins)")
    fig.update_yaxes(title="tokens")
    fig.update_layout(height=320, margin=dict(t=20, b=20), bargap=0)
    st.plotly_chart(fig, width="stretch")
with tab_lens:
    st.caption(record["logit_lens_note"])
    if "logit_lens" in record:
        a, b = st.columns(2)
        a.markdown("**Promoted tokens**")
        a.dataframe(pd.DataFrame(record["logit_lens"]["top"], columns=["token", "logit"]), hide_index=True)
        b.markdown("**Suppressed tokens**")
        b.dataframe(pd.DataFrame(record["logit_lens"]["bottom"], columns=["token", "logit"]), hide_index=True)
with tab_nb:
    st.markdown("Nearest latents by decoder cosine similarity:")
    st.markdown("\n".join(f"- {common.feature_link(n['latent'])}: cos {n['cos']:.3f}" for n in record["neighbours"]))
if heads_run:  # direct feature attribution by head and source token (analysis/attn_dfa.py, docs/methods.md §10.6)
    from analysis.attn_dfa import context_dfa, context_tokens, heads_figures

    with tabs[5]:
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
