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

tab_top, tab_q, tab_hist, tab_lens, tab_nb = st.tabs(["Top contexts", "Quantile samples", "Histogram",
                                                      "Logit lens", "Neighbours"])
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
