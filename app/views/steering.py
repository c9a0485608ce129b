"""Steering page: pick a latent (linked from the feature page), a method, a strength or a sweep, and a prompt; see
the unsteered and steered continuations side by side with their metrics (analysis.steering, §10.4)."""
import pandas as pd
import streamlit as st

from analysis.steering import SteeringError, ablate, additive, clamp, decoder_direction, generate, prompt_tokens
from analysis.steering_metrics import score, tradeoff_figure
from app import common

st.title("Steering")
run = common.require_run()
model_name = run.config().get("cache", {}).get("model")
hook = run.sae_cfg().get("metadata", {}).get("hook_name") or run.summary().get("hook")
if not model_name or not hook:
    st.error(f"{run.path} does not say which model and hook it was trained on.")
    st.stop()
model, sae = common.model_and_sae(model_name, str(run.path))
methods = ["additive", "clamp", "ablate"] + (["signed"] if sae.signed else [])

try:
    start = min(max(int(st.query_params.get("latent", 0)), 0), sae.cfg.d_sae - 1)
except ValueError:
    start = 0
left, mid, right = st.columns([1, 1, 2])
latent = int(left.number_input(f"Latent (0..{sae.cfg.d_sae - 1})", 0, sae.cfg.d_sae - 1, start, key="steer_latent"))
method = mid.selectbox("Method", methods, key="steer_method",
                       help="additive: h + α·d_i; clamp: set z_i = α keeping the SAE error; ablate: z_i = 0; "
                            "signed: ±α along d_i (signed SAEs)")
alphas_text = right.text_input("α (one value, or several separated by commas for a sweep)", "0, 2, 4, 8",
                               key="steer_alphas")
prompt = st.text_area("Prompt", "It is a truth universally acknowledged", key="steer_prompt", height=80)
max_new = st.slider("New tokens", 1, 60, 20, key="steer_tokens")
st.markdown(common.feature_link(latent, f"Feature page of latent {latent}"))


def make_edit(alpha: float):
    if method == "additive" or method == "signed":
        return additive(decoder_direction(sae, latent), alpha)
    if method == "clamp":
        return clamp(sae, latent, alpha)
    return ablate(sae, latent)


if st.button("Steer", type="primary", key="steer_go"):
    try:
        alphas = [float(a) for a in alphas_text.replace(" ", "").split(",") if a]
        if not alphas:
            raise SteeringError("Give at least one value of α.")
        if method == "ablate":
            alphas = alphas[:1]
        tokens = prompt_tokens(model, prompt)
        plain = generate(model, hook, tokens, None, max_new)
        rows = []
        for alpha in alphas:
            edit = make_edit(alpha)
            out = generate(model, hook, tokens, edit, max_new)
            rows.append({"alpha": alpha, "method": method, "text": model.tokenizer.decode(out[0, tokens.shape[1]:]),
                         **score(model, sae, hook, out, tokens.shape[1], edit, latent)})
    except (SteeringError, ValueError) as error:
        st.error(str(error))
        st.stop()
    a, b = st.columns(2)
    a.subheader("Unsteered")
    a.write(prompt + "**" + model.tokenizer.decode(plain[0, tokens.shape[1]:]) + "**")
    b.subheader(f"Steered ({method}, α = {rows[-1]['alpha']:g})")
    b.write(prompt + "**" + rows[-1]["text"] + "**")
    st.dataframe(pd.DataFrame(rows), hide_index=True, use_container_width=True)
    if len(rows) > 1:
        st.plotly_chart(tradeoff_figure(rows), use_container_width=True)
