"""Steering page: pick a latent (linked from the feature page), a method, a strength or a sweep, and a prompt; see
the unsteered continuation and every α's continuation side by side, with their metrics (analysis.steering, §10.4).

The default sweep (two values of α, 12 new tokens) answers in seconds on the demo run: the unsteered and every α's
continuation are generated together as one batch (a cache-free forward per new token), then each α is scored (two
forwards); progress is shown per token and per α."""
import html
import time

import pandas as pd
import streamlit as st

from analysis.steering import (SteeringError, ablate, additive, check_alpha, clamp, decoder_direction, generate,
                               per_row, prompt_tokens)
from analysis.steering_metrics import score, tradeoff_figure
from app import common

DEFAULT_ALPHAS = "4, 8"
DEFAULT_NEW_TOKENS = 12
MAX_ALPHAS = 12
COLUMNS_PER_ROW = 4
MARKDOWN_CHARS = "\\`*_{}[]()#+-.!|~$:"


def safe_html(text: str) -> str:
    """Model output as inert HTML: escaped, markdown and math characters as entities, newlines as <br> (so nothing
    in the text can start a list, a heading, a link, a formula or end the HTML block)."""
    escaped = "".join(html.escape(c) if c in "&<>\"'" else f"&#{ord(c)};" if c in MARKDOWN_CHARS else c for c in text)
    return escaped.replace("\r", "").replace("\n", "<br>")


def md_escape(text: str) -> str:
    """User text quoted in a message that Streamlit renders as markdown: every markdown character backslashed."""
    return "".join("\\" + c if c in MARKDOWN_CHARS + "<>" else c for c in text)


def continuation_html(prompt: str, continuation: str) -> str:
    return ('<div style="white-space:pre-wrap;line-height:1.5"><span style="opacity:0.55">' + safe_html(prompt)
            + "</span><b>" + safe_html(continuation) + "</b></div>")


def decode(model, ids) -> tuple[str, bool]:
    """(text without special tokens, whether any special token was hidden)."""
    ids = [int(i) for i in ids]
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    return model.tokenizer.decode(ids, skip_special_tokens=True), any(i in special for i in ids)


def parse_alphas(text: str, method: str, signed: bool) -> list[float]:
    """The α values of the text field; SteeringError with one sentence for anything that is not a finite number."""
    values = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise SteeringError(f"α must be numbers separated by commas (e.g. {DEFAULT_ALPHAS}): "
                                f"“{md_escape(part)}” is not a number.") from None
        check_alpha(value)
        values.append(value)
    if not values:
        raise SteeringError(f"Give at least one value of α (e.g. {DEFAULT_ALPHAS}).")
    if len(values) > MAX_ALPHAS:
        raise SteeringError(f"At most {MAX_ALPHAS} values of α at once ({len(values)} given): each one is a whole "
                            "generation.")
    if method == "clamp" and not signed and any(v < 0 for v in values):
        raise SteeringError("This SAE's codes are non-negative: clamp to values of α >= 0, or use additive steering "
                            "with a negative α.")
    return values[:1] if method == "ablate" else values


def target_token(model, text: str) -> tuple[list[int] | None, str]:
    """(target ids, note): the first token of the target text, whose teacher-forced log-prob change is reported."""
    if not text.strip():
        return None, ""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SteeringError("The target token field holds no token: type a word, e.g. “ happy” (with its space).")
    shown = model.tokenizer.decode(ids[:1])
    note = f"target token “{md_escape(shown)}” (id {ids[0]})"
    if len(ids) > 1:
        note += f", the first of the {len(ids)} tokens of “{md_escape(text)}”"
    return ids[:1], note


st.title("Steering")
run = common.require_run()
model_name = run.config().get("cache", {}).get("model")
hook = run.sae_cfg().get("metadata", {}).get("hook_name") or run.summary().get("hook")
if not model_name or not hook:
    st.error(f"{run.path} does not say which model and hook it was trained on.")
    st.stop()
model, sae = common.model_and_sae(model_name, str(run.path))
store = common.require_features(run) if run.has_features() else None
methods = ["additive", "clamp", "ablate"] + (["signed"] if sae.signed else [])

try:
    start = min(max(int(st.query_params.get("latent", 0)), 0), sae.cfg.d_sae - 1)
except ValueError:
    start = 0
left, mid, right = st.columns([1, 1, 2])
latent = int(left.number_input(f"Latent (0..{sae.cfg.d_sae - 1})", 0, sae.cfg.d_sae - 1, start, key="steer_latent"))
method = mid.selectbox("Method", methods, key="steer_method",
                       help="additive: h + α·d_i; clamp: set z_i = α keeping the SAE error; ablate: z_i = 0 (α not "
                            "used); signed: ±α along d_i (signed SAEs)")
alphas_text = right.text_input("α (one value, or several separated by commas for a sweep)", DEFAULT_ALPHAS,
                               key="steer_alphas", help="Each value is one generation of the chosen length; the "
                               "unsteered continuation is always shown beside them.")
prompt = st.text_area("Prompt", "It is a truth universally acknowledged", key="steer_prompt", height=80)
a, b = st.columns([2, 1])
max_new = a.slider("New tokens", 1, 60, DEFAULT_NEW_TOKENS, key="steer_tokens",
                   help="Generation is cache-free (a whole forward per token): fewer tokens answer faster.")
target_text = b.text_input("Target token (optional)", "", key="steer_target", placeholder="e.g.  happy",
                           help="Reports the teacher-forced change in this token's log-probability over the "
                                "continuation (steered minus unsteered), as target_logprob_change.")
st.markdown(common.feature_link(latent, f"Feature page of {common.latent_title(store, latent)}"), unsafe_allow_html=True)


def make_edit(alpha: float):
    if method in ("additive", "signed"):
        return additive(decoder_direction(sae, latent), alpha)
    if method == "clamp":
        return clamp(sae, latent, alpha)
    return ablate(sae, latent)


def steer() -> dict:
    """Every α's continuation and metrics, with progress in a status box: the continuations are generated together
    as one batch (the prompt repeated, row i edited by α_i: per_row), token by token, then scored α by α."""
    alphas = parse_alphas(alphas_text, method, sae.signed)
    tokens = prompt_tokens(model, prompt)
    targets, note = target_token(model, target_text)
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] + max_new > n_ctx:
        raise SteeringError(f"The prompt ({tokens.shape[1]} tokens) plus {max_new} new tokens must fit the model's "
                            f"context of {n_ctx} tokens: shorten the prompt or ask for fewer tokens.")
    started = time.perf_counter()
    plen = tokens.shape[1]
    with st.status(f"Steering with {common.latent_title(store, latent)}: {len(alphas)} value(s) of α, {max_new} new "
                   "tokens each", expanded=True) as status:
        bar = st.progress(0.0, text="Generating")
        plains = st.session_state.setdefault("steer_plain", {})  # the unsteered text does not depend on latent or α
        key = (str(run.path), prompt, max_new)
        edits = [make_edit(alpha) for alpha in alphas]
        # adding 0 x d_i changes nothing: that row is the unsteered continuation, not generated again
        steered = [i for i, alpha in enumerate(alphas) if not (method in ("additive", "signed") and alpha == 0)]
        batch = ([None] if key not in plains else []) + [edits[i] for i in steered]  # one batch of generations
        outs = tokens[:0]
        if batch:
            def ticker(done: int, total: int):
                bar.progress(done / total * 0.9, text=f"{len(batch)} continuation(s) together: token {done} of {total}")

            outs = generate(model, hook, tokens.repeat(len(batch), 1), per_row(batch), max_new, progress=ticker)
            if key not in plains:
                plains.clear()  # one prompt at a time is enough
                plains[key], outs = outs[:1], outs[1:]
        plain = plains[key]
        generated = {i: outs[j:j + 1] for j, i in enumerate(steered)}
        rows = []
        for i, (alpha, edit) in enumerate(zip(alphas, edits)):
            label = "ablated" if method == "ablate" else f"α = {alpha:g}"
            bar.progress(0.9 + 0.1 * i / len(alphas), text=f"Scoring {label} ({i + 1} of {len(alphas)})")
            out = generated.get(i, plain)
            text, hidden = decode(model, out[0, plen:])
            rows.append({"alpha": alpha, "method": method, "text": text, "_hidden": hidden,
                         **score(model, sae, hook, out, plen, edit, latent, targets)})
            st.write(f"{label}: done")
        bar.progress(1.0, text="Done")
        seconds = time.perf_counter() - started
        status.update(label=f"Steered {len(alphas)} value(s) of α in {seconds:.1f} s", state="complete",
                      expanded=False)
    plain_text, plain_hidden = decode(model, plain[0, plen:])
    return {"rows": rows, "plain": plain_text, "plain_hidden": plain_hidden, "prompt": prompt, "method": method,
            "latent": latent, "target_note": note, "seconds": seconds}


if st.button("Steer", type="primary", key="steer_go"):
    try:
        st.session_state["steer_result"] = steer()
    except (SteeringError, ValueError) as error:
        st.session_state.pop("steer_result", None)
        st.error(str(error))
        st.stop()

result = st.session_state.get("steer_result")
if result is None:
    st.caption(f"Press Steer: the default sweep (α = {DEFAULT_ALPHAS}, {DEFAULT_NEW_TOKENS} new tokens) takes a few "
               "seconds on a CPU once the model is loaded.")
    st.stop()

rows = result["rows"]
if (result["latent"], result["method"]) != (latent, method):
    st.caption(f"Results below are for latent {result['latent']} ({result['method']}); press Steer for the current "
               "settings.")
st.subheader("Continuations")
cards = [("Unsteered", result["plain"])] + [
    ("Ablated" if r["method"] == "ablate" else f"{r['method']}, α = {r['alpha']:g}", r["text"]) for r in rows]
for begin in range(0, len(cards), COLUMNS_PER_ROW):
    for column, (title, text) in zip(st.columns(COLUMNS_PER_ROW), cards[begin:begin + COLUMNS_PER_ROW]):
        column.markdown(f"**{html.escape(title)}**")
        column.markdown(continuation_html(result["prompt"], text), unsafe_allow_html=True)
if result["plain_hidden"] or any(r["_hidden"] for r in rows):
    st.caption("Special tokens the model generated (e.g. end of text) are hidden from the texts.")
st.caption(f"Greedy, cache-free generation; the prompt is grey, the continuation bold. {result['seconds']:.1f} s.")
table = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
st.dataframe(table, hide_index=True, width="stretch")
notes = ["kl: mean KL(steered || unsteered) over the continuation; perplexity: of the generated tokens under the "
         "unsteered model; target_activation_in_text: the latent's code when the unsteered model reads the steered "
         "text (the concept in the output)"]
if result["target_note"]:
    notes.append(f"target_logprob_change: teacher-forced mean log p_steered - log p_unsteered of the "
                 f"{result['target_note']}")
st.caption("; ".join(notes) + ".")
if len(rows) > 1:
    st.plotly_chart(tradeoff_figure(rows), width="stretch")
