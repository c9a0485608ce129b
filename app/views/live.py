"""Live page: type text, shade it by one latent (the current one or any latent firing on the text), see which
latents fire on each token and open them; activations far above a latent's top contexts are flagged."""
import pandas as pd
import streamlit as st

from app import common

st.title("Live")
run = common.require_run()
store = common.features_or_none(run)
text = st.text_area("Text", key="live_text", placeholder="Type some text and press Ctrl+Enter", height=100)
if not text.strip():
    st.caption("The run's model and SAE encode the text; pick a latent to shade it by, and see each token's "
               "strongest latents.")
    st.stop()
try:
    tokens, codes = common.text_latents(run, text)
except ValueError as error:
    st.error(str(error))
    st.stop()

d_sae = codes.shape[1]
top_max = (store.column("top_values")[:, 0].nan_to_num(0.0) if store is not None else None)
peak, where = codes.max(0)
on_text = [int(i) for i in peak.argsort(descending=True)[:50] if peak[i] > 0]
current = common.current_latent(d_sae)
common.set_latent(current)  # the address names it, so a reload keeps it
fires = bool(peak[current] > 0)
# the current latent (from the Feature page, a link or a pick here) shades the text when it fires on it, else the
# latent firing most on the text does (the current one stays listed)
shade = current if fires or not on_text else on_text[0]
options = [shade] + [i for i in on_text if i != shade] + ([current] if current != shade else [])


def shade_label(i: int) -> str:
    return f"{common.latent_title(store, i)}  (max {float(peak[i]):.3g} on this text)"


def picked_shade() -> None:
    common.set_latent(st.session_state["live_shade"])


st.session_state["live_shade"] = shade
st.selectbox("Shade by latent", options, key="live_shade", format_func=shade_label, on_change=picked_shade,
             help="The current latent (from the Feature page, a link or a pick here) when it fires on the text, "
                  "then the latents firing most on it. Type to filter.")
if shade != current:
    st.caption(f"The current latent {common.md(common.latent_title(store, current))} does not fire on this text: "
               "it is shaded by the latent firing most on it.")
acts = codes[:, shade].tolist()
scale = float(top_max[shade]) if top_max is not None and top_max[shade] > 0 else None
flags = common.flagged(acts, scale)
titles = [f"{t!r}: #{shade} {a:.3f}" for t, a in zip(tokens, acts)]
st.markdown(f"**{len(tokens)} tokens**, shaded by {common.md(common.latent_title(store, shade))}"
            + (f" (full colour = its largest top-context activation, {scale:.3g})" if scale else "") + ":")
st.markdown(common.highlight(tokens, acts, scale, titles=titles, flags=flags), unsafe_allow_html=True)
if flags:
    st.warning(f"Far above latent {shade}'s top contexts (> {common.FLAG_RATIO:g}× {scale:.3g}), boxed in red: "
               + ", ".join(f"token {p} {tokens[p]!r} ({acts[p]:.3g}, {acts[p] / scale:.1f}×)" for p in sorted(flags))
               + ". The feature store leaves out special and outlier-norm tokens (often the first token of a text), "
               "so these activations are outside what its contexts show.")
common.latent_link(shade, store, "open on the Feature page")

st.subheader("Latents firing most on this text")
for i in on_text[:10]:
    ratio = float(peak[i]) / float(top_max[i]) if top_max is not None and top_max[i] > 0 else None
    mark = " ⚠ far above its top contexts" if ratio and ratio > common.FLAG_RATIO else ""
    common.latent_link(i, store, f"max {float(peak[i]):.3g} on {tokens[int(where[i])]!r}"
                       + (f" ({ratio:.2g}× its top)" if ratio else "") + mark)

st.session_state.setdefault("live_k", 5)
top_k = st.slider("Latents listed per token", 1, 10, key="live_k")
values, ids = codes.abs().topk(min(top_k, d_sae), dim=1)
rows = []
for p, tok in enumerate(tokens):
    found = []
    for v, i in zip(values[p], ids[p]):
        if v <= 0:
            continue
        i, a = int(i), float(codes[p, i])
        far = top_max is not None and top_max[i] > 0 and a > common.FLAG_RATIO * float(top_max[i])
        found.append(f"{common.latent_title(store, i)} ({a:.2f}{' ⚠' if far else ''})")
    rows.append({"#": p, "token": repr(tok), f"#{shade}": round(acts[p], 4), "strongest latents": " · ".join(found)})
l0 = (codes != 0).sum(1).float()
st.caption(f"Mean L0 on this text: {l0.mean():.1f} latents per token. ⚠ = more than {common.FLAG_RATIO:g}× the "
           "latent's largest top-context activation.")
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="live_table")
