"""Shared pieces of the Streamlit pages: the runs folder, the run picker, the current latent, links between pages,
cached loaders, token highlighting. Everything read from disk goes through `analysis.store`.

State across pages: the run (the sidebar's picker, mirrored in ?run=), the current latent (session
"current_latent", mirrored in ?latent= by `set_latent`) and the pages' inputs (`PERSIST`, kept by `keep_state` in
the entry script while another page is shown). Links to a latent: `latent_link` (an st.page_link: same tab, same
session, nothing reloads) for lists, `feature_link` (an HTML anchor with target=_self: same tab, the page reloads
with ?latent= and ?run=) inside markdown text and tables."""
import html
import os
import sys
from pathlib import Path

import streamlit as st

from analysis.store import FeatureStore, Run, list_runs

ENV = "SAEWB_RUNS_DIR"
FEATURE_PAGE = "views/feature.py"
LIVE_PAGE = "views/live.py"
# widget values that survive moving to another page and back (Streamlit drops a widget's value when a run of the
# app does not draw it; re-assigning it in the entry script turns it into plain session state until it is drawn)
PERSIST = ("token_query", "text_query", "feature_text", "live_text", "live_k")
FLAG_RATIO = 2.0  # an activation above this multiple of the latent's largest top-context activation is flagged


def runs_dir() -> Path:
    """$SAEWB_RUNS_DIR, else the first script argument (`streamlit run app/streamlit_app.py -- RUNS_DIR`), else
    ./runs. (The variable wins so that in-process tests are not confused by the test runner's own arguments.)"""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if args and Path(args[0]).is_dir():
        return Path(args[0])
    return Path("runs")


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, lies in `root` (itself included)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except OSError:
        return False


def served_runs(root: str | Path) -> list[str]:
    """The run folders the app serves: those under `root` whose real location is inside it too (a symlink to a
    folder elsewhere is left out), so nothing outside the runs folder it was given is ever read."""
    return [str(p) for p in list_runs(root) if inside(p, root)]


@st.cache_data(ttl=30, show_spinner=False)
def cached_runs(root: str) -> list[str]:
    return served_runs(root)


def run_label(path: str, root: Path) -> str:
    try:
        rel = Path(path).relative_to(root)
        return str(rel) if str(rel) != "." else Path(path).name
    except ValueError:
        return path


def sidebar() -> None:
    """Run picker (in the entry script, so it persists across pages). ?run=NAME preselects a run."""
    root = runs_dir()
    runs = cached_runs(str(root))
    st.sidebar.caption(f"Runs folder: `{root}`")
    if not runs:
        st.session_state["run_path"] = None
        st.sidebar.warning("No runs found.")
        return
    labels = [run_label(r, root) for r in runs]
    wanted = st.query_params.get("run")  # only ever compared with the served runs' labels, never opened as a path
    if wanted in labels and "run_label" not in st.session_state:
        st.session_state["run_label"] = wanted
    elif wanted and wanted not in labels:
        st.session_state["refused_run"] = True  # shown again on the rerun that switching to the first page makes
    if (wanted and wanted not in labels) or st.session_state.pop("refused_run", False):
        st.session_state["refused_run"] = bool(wanted and wanted not in labels)
        st.sidebar.warning("The run asked for in the address (?run=) is not one under the runs folder; showing the "
                           "runs found there.")  # the value itself is not echoed: it is untrusted text
    label = st.sidebar.selectbox("Run", labels, key="run_label")
    st.session_state["run_path"] = runs[labels.index(label)]
    if st.query_params.get("run") != label:  # the address names the run, so a reload or a shared link keeps it
        st.query_params["run"] = label
    latent = st.session_state.get("current_latent")
    if latent is not None and "latent" not in st.query_params:  # the sidebar's page menu drops ?latent=: put the
        st.query_params["latent"] = str(latent)  # current one back, so every page (Steering too) can read it
    if latent is not None:
        st.sidebar.page_link(FEATURE_PAGE, label=f"Current latent: {md(f'#{latent}')}", icon=":material/lightbulb:",
                             query_params=link_params(latent))


def keep_state() -> None:
    """Keep the pages' inputs (PERSIST) while another page is shown: call at the top of the entry script."""
    for key in PERSIST:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def md(text: str) -> str:
    """Text shown literally inside Streamlit markdown (labels and tokens hold *, _, `, [, <, $ ...)."""
    out = html.escape(str(text), quote=False)
    for ch in "\\`*_{}[]()#+-.!|~$":
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def current_latent(d_sae: int) -> int:
    """The latent the pages share: ?latent= when it just arrived (a link, a typed address), else the session's,
    else 0; kept inside 0..d_sae-1 (another run may be smaller)."""
    param = st.query_params.get("latent")
    if param is not None and param != st.session_state.get("_latent_param"):
        st.session_state["_latent_param"] = param
        try:
            st.session_state["current_latent"] = int(param)
        except ValueError:
            pass
    latent = st.session_state.get("current_latent", 0)
    return min(max(int(latent), 0), max(d_sae - 1, 0))


def set_latent(latent: int) -> None:
    """Make `latent` the current one (the session's and the address's ?latent=)."""
    latent = int(latent)
    st.session_state["current_latent"] = latent
    st.session_state["_latent_param"] = str(latent)
    st.query_params["latent"] = str(latent)  # sent even when equal: a page link to the page already shown
    # changes the page's query parameters but not the browser's address, and this puts it right


def link_params(latent: int) -> dict[str, str]:
    params = {"latent": str(int(latent))}
    run = st.session_state.get("run_label")
    if run:
        params["run"] = run
    return params


def latent_link(latent: int, store: FeatureStore | None = None, detail: str = "", page: str = FEATURE_PAGE,
                container=None, text: str | None = None, icon: str | None = None) -> None:
    """A link to a latent's page drawn as st.page_link: '#id label · detail' (or `text`); it opens in the same tab
    and keeps the session (the run, the current searches). `page` may be another page that reads ?latent=."""
    if text is None:
        text = f"**#{int(latent)}** {md(latent_title(store, latent)[len(f'#{int(latent)}'):].strip())}"
        if detail:
            text += f" · {md(detail)}"
    (container or st).page_link(page, label=text, icon=icon, query_params=link_params(latent))


def current_run() -> Run | None:
    path = st.session_state.get("run_path")
    if path is None and "run_path" not in st.session_state:  # page run on its own (tests): first run found
        runs = cached_runs(str(runs_dir()))
        path = runs[0] if runs else None
    return Run(path) if path else None


def require_run() -> Run:
    run = current_run()
    if run is None:
        st.info(f"No runs under `{runs_dir()}`: train one with `saewb train` or `saewb demo`, then reload.")
        st.stop()
    return run


@st.cache_resource(show_spinner="Loading feature store...")
def feature_store(folder: str, stamp: float) -> FeatureStore:
    return FeatureStore(folder)


def store_stamp(run: Run) -> float:
    """When the run's feature store last changed: its index, labels or explanations (a later
    `saewb features --labels-only --explainer-url ...` is picked up without restarting the app)."""
    from analysis.labels import EXPLANATIONS, LABELS

    folder = run.path / "features"
    return max((folder / name).stat().st_mtime for name in ("index.json", LABELS, EXPLANATIONS)
               if (folder / name).is_file())


def require_features(run: Run) -> FeatureStore:
    if not run.has_features():
        st.warning(f"No feature store for this run yet: run `saewb features {run.path}`.")
        st.stop()
    return feature_store(str(run.path / "features"), store_stamp(run))


@st.cache_resource(show_spinner="Loading model and SAE...")
def model_and_sae(model_name: str, run_path: str):
    from saes import load_sae
    from training.model import load_model

    return load_model(model_name), load_sae(run_path)


def text_latents(run: Run, text: str):
    """(token strings, codes [pos, d_sae]) of a text under the run's model and SAE (BOS row dropped)."""
    from analysis.features import text_codes

    model_name = run.config().get("cache", {}).get("model")
    hook = run.summary().get("hook") or run.sae_cfg().get("metadata", {}).get("hook_name")
    if not model_name or not hook:
        raise ValueError(f"{run.path} does not say which model and hook it was trained on.")
    model, sae = model_and_sae(model_name, str(run.path))
    ids, codes = text_codes(model, sae, hook, text)
    strings = [model.tokenizer.decode([i]) for i in ids]
    return strings[1:], codes[1:]


def show_token(text: str) -> str:
    return html.escape(text).replace("\n", "⏎").replace(" ", "&nbsp;") or "&nbsp;"


def spans(tokens: list[str], acts: list[float], scale: float | None = None, centre: int | None = None,
          titles: list[str] | None = None, flags: set[int] | frozenset = frozenset()) -> str:
    """One HTML span per token, background by activation (orange positive, blue negative, full colour at `scale`),
    the centre token underlined, flagged tokens (`flags`, positions) boxed in red."""
    scale = scale or max([abs(a) for a in acts] + [1e-9])
    out = []
    for i, (tok, act) in enumerate(zip(tokens, acts)):
        alpha = min(abs(act) / scale, 1.0)
        colour = f"rgba(255,140,0,{alpha:.2f})" if act >= 0 else f"rgba(60,120,255,{alpha:.2f})"
        title = titles[i] if titles else f"{act:.3f}"
        style = f"background:{colour};border-radius:3px;padding:1px 0"
        if i == centre:
            style += ";border-bottom:2px solid #c00;font-weight:600"
        cls = "tok tok-on" if act != 0 else "tok"
        if i in flags:
            style += ";outline:2px solid #d00"
            cls += " tok-flag"
        out.append(f'<span class="{cls}" title="{html.escape(title)}" style="{style}">{show_token(tok)}</span>')
    return "".join(out)


BLOCK = '<div style="font-family:monospace;line-height:1.9;margin:2px 0 6px 0;white-space:normal">'


def highlight(tokens: list[str], acts: list[float], scale: float | None = None, centre: int | None = None,
              titles: list[str] | None = None, flags: set[int] | frozenset = frozenset()) -> str:
    """A block of highlighted tokens (see `spans`)."""
    return BLOCK + spans(tokens, acts, scale, centre, titles, flags) + "</div>"


def context(example: dict, scale: float | None, left: int = 10, right: int = 3) -> str:
    """One stored context: its activation inline, then the `left` tokens before the centre token and the `right`
    after it; a click (HTML <details>, no rerun) shows the whole stored window."""
    tokens, acts, centre = example["tokens"], example["acts"], example["centre"]
    badge = ('<span class="ctx-value" style="display:inline-block;min-width:4.2em;background:#eee;border-radius:3px;'
             f'padding:0 4px;margin-right:6px;text-align:right">{example["value"]:.3g}</span>')
    lo, hi = max(0, centre - left), min(len(tokens), centre + right + 1)
    short = spans(tokens[lo:hi], acts[lo:hi], scale, centre - lo)
    if lo == 0 and hi == len(tokens):
        return BLOCK + badge + short + "</div>"
    dots = '<span style="color:#999">…</span>'
    summary = badge + (dots if lo > 0 else "") + short + (dots if hi < len(tokens) else "")
    return ('<details class="ctx" style="font-family:monospace;line-height:1.9;margin:1px 0">'
            f'<summary style="cursor:pointer">{summary}</summary>'
            f'<div class="ctx-long" style="margin:0 0 6px 1.4em">{spans(tokens, acts, scale, centre)}</div></details>')


def contexts(examples: list[dict], scale: float | None) -> str:
    return "".join(context(e, scale) for e in examples)


def feature_href(latent: int) -> str:
    from urllib.parse import urlencode

    return "feature?" + urlencode(link_params(latent))


def feature_link(latent: int, text: str | None = None, store: FeatureStore | None = None) -> str:
    """An HTML link to a latent's feature page for markdown text and tables (render it with
    unsafe_allow_html=True): it opens in the same tab (target=_self) and the address carries ?latent= and the
    selected ?run=; the text defaults to '#id label'. For lists prefer `latent_link` (no page reload)."""
    label = text if text is not None else latent_title(store, latent)
    return (f'<a href="{html.escape(feature_href(latent))}" target="_self" class="latent-link">'
            f"{html.escape(label)}</a>")


def features_or_none(run: Run) -> FeatureStore | None:
    """The run's feature store when it has one (labels, top activations), else None."""
    if not run.has_features():
        return None
    return feature_store(str(run.path / "features"), store_stamp(run))


def flagged(acts, top_max: float | None, ratio: float = FLAG_RATIO) -> set[int]:
    """Positions whose activation exceeds `ratio` times the latent's largest top-context activation."""
    if not top_max or top_max <= 0:
        return set()
    return {i for i, a in enumerate(acts) if float(a) > ratio * top_max}


def latent_title(store: FeatureStore | None, latent: int) -> str:
    """'#id label' for a latent wherever one is shown (the label comes from the feature store when it has one)."""
    label = store.label(latent) if store is not None and hasattr(store, "label") else ""
    return f"#{latent} {label}".strip()
