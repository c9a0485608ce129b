"""The saewb workbench app. Start it with `saewb app RUNS_DIR` (or `make app`); the runs folder comes from the
first argument after `--`, else $SAEWB_RUNS_DIR, else ./runs."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import common  # noqa: E402

st.set_page_config(page_title="saewb", layout="wide")
common.keep_state()
runs_page = st.Page("views/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs")


def home() -> None:
    """The app's root address opens the Runs page at /runs (Streamlit serves its default page at / only, so Runs
    itself is not the default: /runs then resolves like every other page), keeping ?run= and ?latent=."""
    st.switch_page(runs_page, query_params=st.query_params.to_dict())


pages = [
    st.Page(home, title="Home", url_path="home", default=True, visibility="hidden"),
    runs_page,
    st.Page("views/feature.py", title="Feature", icon=":material/lightbulb:", url_path="feature"),
    st.Page("views/live.py", title="Live", icon=":material/edit_note:", url_path="live"),
    st.Page("views/steering.py", title="Steering", icon=":material/alt_route:", url_path="steering"),
    st.Page("views/circuits.py", title="Circuits", icon=":material/account_tree:", url_path="circuits"),
]
page = st.navigation(pages)
common.sidebar()
page.run()
