"""Shared pieces of the Streamlit pages: the runs folder, the run picker, cached loaders, token highlighting.
Everything read from disk goes through `analysis.store`."""
import html
import os
import sys
from pathlib import Path

import streamlit as st

from analysis.store import FeatureStore, Run, list_runs

ENV = "SAEWB_RUNS_DIR"


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
        st.sidebar.warning("The run asked for in the address (?run=) is not one under the runs folder; showing the "
                           "runs found there.")  # the value itself is not echoed: it is untrusted text
    label = st.sidebar.selectbox("Run", labels, key="run_label")
    st.session_state["run_path"] = runs[labels.index(label)]


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


def require_features(run: Run) -> FeatureStore:
    if not run.has_features():
        st.warning(f"No feature store for this run yet: run `saewb features {run.path}`.")
        st.stop()
    index = run.path / "features" / "index.json"
    return feature_store(str(run.path / "features"), index.stat().st_mtime)


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


def highlight(tokens: list[str], acts: list[float], scale: float | None = None, centre: int | None = None,
              titles: list[str] | None = None) -> str:
    """HTML spans, background by activation (orange positive, blue negative), the centre token underlined."""
    scale = scale or max([abs(a) for a in acts] + [1e-9])
    spans = []
    for i, (tok, act) in enumerate(zip(tokens, acts)):
        alpha = min(abs(act) / scale, 1.0)
        colour = f"rgba(255,140,0,{alpha:.2f})" if act >= 0 else f"rgba(60,120,255,{alpha:.2f})"
        title = titles[i] if titles else f"{act:.3f}"
        style = f"background:{colour};border-radius:3px;padding:1px 0"
        if i == centre:
            style += ";border-bottom:2px solid #c00;font-weight:600"
        cls = "tok tok-on" if act != 0 else "tok"
        spans.append(f'<span class="{cls}" title="{html.escape(title)}" style="{style}">{show_token(tok)}</span>')
    return ('<div style="font-family:monospace;line-height:1.9;margin:2px 0 6px 0;white-space:normal">'
            + "".join(spans) + "</div>")


def feature_link(latent: int, text: str | None = None) -> str:
    """Markdown link to a latent's feature page (keeps the selected run)."""
    from urllib.parse import quote

    label = text or f"#{latent}"
    run = st.session_state.get("run_label")
    suffix = f"&run={quote(run)}" if run else ""
    return f"[{label}](feature?latent={latent}{suffix})"


def latent_title(store: FeatureStore | None, latent: int) -> str:
    """'#id label' for a latent wherever one is shown (the label comes from the feature store when it has one)."""
    label = store.label(latent) if store is not None and hasattr(store, "label") else ""
    return f"#{latent} {label}".strip()
