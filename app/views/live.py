"""Live page: type text, see which latents fire on each token, with links to their feature pages."""
import streamlit as st

from app import common

st.title("Live")
run = common.require_run()
text = st.text_area("Text", key="live_text", placeholder="Type some text and press Ctrl+Enter", height=100)
top_k = st.slider("Latents shown per token", 1, 10, 5, key="live_k")
if not text.strip():
    st.caption("The run's model and SAE encode the text; each token shows its strongest latents.")
    st.stop()
try:
    tokens, codes = common.text_latents(run, text)
except ValueError as error:
    st.error(str(error))
    st.stop()

values, ids = codes.abs().topk(min(top_k, codes.shape[1]), dim=1)
strongest = codes.abs().max(1).values
titles = [", ".join(f"#{int(i)} {float(codes[p, i]):.2f}" for v, i in zip(values[p], ids[p]) if v > 0) or "none"
          for p in range(len(tokens))]
st.markdown(f"**{len(tokens)} tokens**, shaded by their strongest latent (hover for the latents):")
st.markdown(common.highlight(tokens, strongest.tolist(), titles=titles), unsafe_allow_html=True)
l0 = (codes != 0).sum(1).float()
st.caption(f"Mean L0 on this text: {l0.mean():.1f} latents per token.")
lines = ["| # | token | strongest latents |", "|---|---|---|"]
for p, tok in enumerate(tokens):
    links = [common.feature_link(int(i), f"#{int(i)} ({float(codes[p, i]):.2f})")
             for v, i in zip(values[p], ids[p]) if v > 0]
    shown = common.show_token(tok).replace("|", "&#124;")
    lines.append(f"| {p} | <code>{shown}</code> | {', '.join(links) or '-'} |")
st.markdown("\n".join(lines), unsafe_allow_html=True)
