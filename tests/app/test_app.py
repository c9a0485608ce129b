"""The feature store against brute force, every app page under AppTest (labels, links, the shared latent and
searches, the density view, the latent shading and its flags), and the real server in headless Chromium (links open
in the same tab and keep the run, the latent and the search)."""
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from analysis.features import FeaturesConfig, build_features
from analysis.store import FeatureStore, Run, list_runs
from app.cli import main

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app" / "streamlit_app.py"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with one tiny demo run, its feature store and an eval figure."""
    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "tiny"
    assert main(["demo", "--model", "tiny", "--tokens", "16384", "--run-dir", str(run_dir)]) == 0
    build_features(FeaturesConfig(run_dir=run_dir, top_n=8, samples=12, progress=False))
    figures = run_dir / "eval" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "fvu_by_k.json").write_text(json.dumps(
        {"data": [{"type": "scatter", "x": [8, 16, 32], "y": [0.4, 0.3, 0.2]}],
         "layout": {"title": {"text": "FVU by k"}}}))
    return root


@pytest.fixture(scope="module")
def brute(runs):
    """Codes of every kept cached token, computed directly: [n_tokens, d_sae], and the cached rows kept."""
    from saes import load_sae
    from training.activation_store import ActivationCache

    run = Run(runs / "tiny")
    summary = run.summary()
    cache = ActivationCache(summary["cache"])
    sae = load_sae(run.path)
    acts = torch.cat([cache.read(i, f"acts.{summary['hook']}") for i in range(cache.n_shards)])
    keep = torch.cat([cache.keep_mask(i, summary["hook"]) for i in range(cache.n_shards)])
    tokens = torch.cat([cache.tokens(i).reshape(-1) for i in range(cache.n_shards)])
    with torch.no_grad():
        codes = sae.encode(acts).float() * keep[:, None]
    return codes, keep, tokens


def test_feature_store_matches_brute_force(runs, brute):
    codes, keep, tokens = brute
    store = Run(runs / "tiny").features()
    assert store.index["n_tokens"] == int(keep.sum())
    density = store.column("density")
    for latent in (0, 7, 100, 255):
        record = store.latent(latent)
        column = codes[:, latent]
        firing = column[keep] != 0
        assert record["density"] == pytest.approx(firing.float().mean().item(), rel=1e-5)
        assert density[latent].item() == pytest.approx(record["density"])
        if not firing.any():
            assert record["top"] == []
            continue
        assert record["mean_act"] == pytest.approx(column[column != 0].mean().item(), rel=1e-4)
        top = record["top"]
        values = [e["value"] for e in top]
        assert values[0] == pytest.approx(column.max().item(), rel=1e-5)
        assert values == sorted(values, reverse=True)
        expected = column.topk(len(top)).values.tolist()
        assert values == pytest.approx(expected, rel=1e-5)
        for example in top[:3]:  # the window's centre is the example's own token and activation
            assert example["acts"][example["centre"]] == pytest.approx(example["value"], rel=1e-5)
            assert example["token_ids"][example["centre"]] == tokens[example["row"]].item()
            assert column[example["row"]].item() == pytest.approx(example["value"], rel=1e-5)
        samples = [e["value"] for e in record["samples"]]
        assert samples == sorted(samples) and all(column[e["row"]] != 0 for e in record["samples"])
        assert sum(record["hist"]["counts"]) == int(firing.sum())
        assert len(record["neighbours"]) == 10 and latent not in [n["latent"] for n in record["neighbours"]]
        assert len(record["logit_lens"]["top"]) == 10 and "γ" in record["logit_lens_note"]
    labels = json.loads((runs / "tiny" / "features" / "labels.json").read_text())  # saved with the store
    assert len(labels) == store.d_sae and all(labels) and store.label(7) == labels[7]


def test_store_lists_runs_and_searches_tokens(runs):
    assert list_runs(runs) == [runs / "tiny"]
    run = Run(runs / "tiny")
    assert run.metrics() and run.eval_figures()["fvu_by_k"]["data"][0]["y"] == [0.4, 0.3, 0.2]
    assert run.wandb_dir() is not None and run.comparisons() == {}
    store = run.features()
    token = store.latent(0)["top"][0]
    word = token["tokens"][token["centre"]]
    hits = store.search_token(word)
    assert 0 in [h["latent"] for h in hits]
    assert store.search_token("no-such-token-xyz") == []
    # logit-lens search agrees with the stored lens: every hit lists the token among its top promoted ids
    lens_hits = store.search_lens(word)
    ids = store.token_ids(word)
    top_ids = store.column("lens_top_ids")
    assert all(any(int(t) in ids for t in top_ids[h["latent"]]) for h in lens_hits)
    promoted = store.token_str(int(top_ids[0, 0]))  # latent 0's most promoted token finds latent 0, at rank 1
    assert {"latent": 0, "rank": 1} in [{k: h[k] for k in ("latent", "rank")} for h in store.search_lens(promoted)]
    with pytest.raises(ValueError, match="out of range"):
        store.latent(10_000)
    with pytest.raises(ValueError, match="saewb features"):
        FeatureStore(runs / "nowhere")


@pytest.fixture
def app_test(runs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEWB_RUNS_DIR", str(runs))
    return AppTest.from_file(str(APP), default_timeout=90)


def errors(at) -> list[str]:
    return [e.value for e in at.exception] + [e.value for e in at.error]


def test_runs_page(app_test):
    at = app_test.run()
    assert not errors(at)
    assert at.title[0].value == "Runs"
    assert "1 run(s) found" in " ".join(c.value for c in at.caption)
    charts = at.get("plotly_chart")
    assert len(charts) >= 2  # training curves + the eval figures (the demo's report card and the one added here)
    assert any("FVU by k" in chart.proto.spec for chart in charts[1:])
    assert any("wandb" in m.value for m in at.markdown)


def chart(at, text: str) -> dict:
    """The first plotly chart whose figure JSON contains `text`."""
    return next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if text in c.proto.spec)


def links(at) -> list[tuple[str, str]]:
    """(label, query string) of every st.page_link drawn."""
    return [(p.value, p.proto.query_string) for p in at.page_link]


def test_feature_page(app_test, runs):
    from app.common import latent_title, md

    store = FeatureStore(runs / "tiny" / "features")
    at = app_test
    at.query_params["latent"] = "5"
    at.switch_page("views/feature.py").run()
    assert not errors(at)
    assert at.header[0].value == md(latent_title(store, 5)) and store.label(5) in at.header[0].value.replace("\\", "")
    top = next(m.value for m in at.markdown if "ctx-value" in m.value)  # top contexts: the value inline, and a
    assert "tok-on" in top and "<details" in top and "ctx-long" in top  # click opens the whole stored window
    record = store.latent(5)
    assert f'{record["top"][0]["value"]:.3g}</span>' in top
    groups = [m.value for m in at.markdown if m.value.startswith("**Quantile")]
    assert len(groups) == 5  # 12 samples in 5 quantile groups
    hist = chart(at, "activation (log bins)")  # the histogram's axis spans the bins with data, one either side
    low, high = hist["layout"]["xaxis"]["range"]
    edges, counts = record["hist"]["edges"], record["hist"]["counts"]
    used = [i for i, c in enumerate(counts) if c]
    assert 10 ** low == pytest.approx(edges[max(used[0] - 1, 0)], rel=1e-4)
    assert 10 ** high == pytest.approx(edges[min(used[-1] + 2, len(counts))], rel=1e-4)
    density = chart(at, "log10 density")  # every latent's density, this one marked
    assert len(density["data"][0]["x"]) == int((store.column("density") > 0).sum())
    assert any(shape["x0"] == pytest.approx(math.log10(record["density"])) for shape in density["layout"]["shapes"])
    assert chart(at, "Promoted tokens")["data"][0]["type"] == "bar"  # logit lens as bars
    neighbours = [n["latent"] for n in record["neighbours"]]  # labelled links that keep the run
    assert {q for _, q in links(at)} >= {f"latent={n}&run=tiny" for n in neighbours}
    assert any(label.startswith(f"**#{neighbours[0]}** ") and "cos" in label for label, _ in links(at))
    # try your own text: shaded by this latent
    at.text_area(key="feature_text").input("Mr. Woodhouse said that Emma was happy.").run()
    assert not errors(at)
    assert any("tok" in m.value and "Mr" in m.value for m in at.markdown)
    assert any(c.value.startswith("Latent 5 on your text: max") for c in at.caption)
    # searches: by token (top contexts, logit lens) and by label text; links carry the latent and the run
    at.text_input(key="token_query").input("the").run()
    assert not errors(at)
    assert any("centre on" in m.value for m in at.markdown)
    word = next(label.split("›")[0].lstrip("‹") for label in store.labels if label.startswith("‹"))
    at.text_input(key="token_query").input(word).run()
    hits = store.search_text(word)
    assert hits and any(q == f"latent={hits[0]['latent']}&run=tiny" for _, q in links(at))
    at.text_input(key="text_query").input("Mr. Woodhouse said").run()
    assert not errors(at)
    assert any("on 'Mr'" in label or "on ' Wood" in label for label, _ in links(at))
    at.number_input(key="latent").set_value(7).run()
    assert at.header[0].value == md(latent_title(store, 7)) and at.query_params["latent"] == "7"
    # the latent and the searches survive a visit to another page
    at.switch_page("views/live.py").run()
    at.switch_page("views/feature.py").run()
    assert not errors(at)
    assert at.header[0].value == md(latent_title(store, 7)) and at.text_input(key="token_query").value == word
    assert at.text_input(key="text_query").value == "Mr. Woodhouse said"


def test_feature_page_shows_explanations(app_test, runs):
    """With explanations.json (an explainer run), the header shows the explanation and its detection score, the
    search finds explanation text, and the table of all latents is sorted by score."""
    path = runs / "tiny" / "features" / "explanations.json"
    path.write_text(json.dumps({"version": 1, "explainer_model": "fake-llm", "latents": {
        "5": {"explanation": "greetings in letters", "score": 0.75}, "9": {"explanation": "zebra stripes", "score": 0.9},
        "2": {"explanation": "unscored zebra", "score": None}}, "failed": {}}))
    try:
        at = app_test
        at.query_params["latent"] = "5"
        at.switch_page("views/feature.py").run()
        assert not errors(at)
        assert any(m.value.startswith("**Explanation** (fake\\-llm, detection score 0.75)") for m in at.markdown)
        at.text_input(key="token_query").input("zebra").run()
        assert [q for _, q in links(at) if q in ("latent=9&run=tiny", "latent=2&run=tiny")] == [
            "latent=9&run=tiny", "latent=2&run=tiny"]  # best score first, unscored last
        table = at.dataframe[0].value
        assert list(table["latent"][:3]) == [9, 5, 2] and list(table["score"][:2]) == [0.9, 0.75]
    finally:
        path.unlink()


def inline_link_script():
    import streamlit as st

    from app.common import feature_link

    st.session_state["run_label"] = "a b"
    st.markdown(feature_link(3, "#3 ‹x›"), unsafe_allow_html=True)


def test_links_open_in_the_same_tab(app_test):
    """Page links (lists) carry the latent and the run; inline links (markdown tables) are anchors with
    target=_self, so they do not open a new tab either."""
    from streamlit.testing.v1 import AppTest

    at = app_test
    at.switch_page("views/feature.py").run()
    assert links(at) and all(q.startswith("latent=") and q.endswith("&run=tiny") for _, q in links(at))
    inline = AppTest.from_function(inline_link_script, default_timeout=90).run()
    assert inline.markdown[0].value == ('<a href="feature?latent=3&amp;run=a+b" target="_self" '
                                        'class="latent-link">#3 ‹x›</a>')


def test_live_page(app_test, runs, monkeypatch):
    from app.common import latent_title, md

    store = FeatureStore(runs / "tiny" / "features")
    at = app_test
    at.query_params["latent"] = "2"
    at.switch_page("views/live.py").run()
    assert not errors(at)
    at.text_area(key="live_text").input("Emma was very happy.").run()
    assert not errors(at)
    box = at.selectbox(key="live_shade")
    shade = box.value
    assert box.options[0] == box.format_func(shade) and latent_title(store, shade) in box.options[0]  # labelled
    shaded = next(m.value for m in at.markdown if 'class="tok' in m.value)
    assert f"#{shade} " in shaded  # every token's hover names the shading latent and its activation
    assert any(md(latent_title(store, shade)) in m.value for m in at.markdown if m.value.startswith("**"))
    assert any(q.startswith("latent=") for _, q in links(at))
    other = next(o for o in box.options[1:])
    pick = int(other.split()[0].lstrip("#"))
    box.select(pick).run()  # picking a latent shades by it and makes it the current one
    assert not errors(at)
    assert at.selectbox(key="live_shade").value == pick and at.session_state["current_latent"] == pick
    assert at.query_params["latent"] == str(pick)
    assert not any("tok-flag" in m.value for m in at.markdown)
    # an activation above twice the latent's top-context maximum is flagged (here every one: the stored maxima are
    # made tiny)
    original = FeatureStore.column

    def tiny_top(self, name):
        column = original(self, name)
        return column * 1e-6 if name == "top_values" else column

    monkeypatch.setattr(FeatureStore, "column", tiny_top)
    at.text_area(key="live_text").input("Emma was very happy!").run()
    assert not errors(at)
    assert any("tok-flag" in m.value for m in at.markdown)
    assert any("Far above latent" in w.value for w in at.warning)


def test_steering_page(app_test):
    at = app_test
    at.query_params["latent"] = "3"
    at.switch_page("views/steering.py").run()
    assert not errors(at)
    at.text_input(key="steer_alphas").input("0, 8").run()
    at.slider(key="steer_tokens").set_value(3).run()
    at.button(key="steer_go").click().run()
    assert not errors(at)
    table = at.dataframe[0].value
    assert list(table["alpha"]) == [0.0, 8.0] and table["kl"][0] == pytest.approx(0, abs=1e-6) and table["kl"][1] > 0
    assert at.get("plotly_chart")  # the trade-off figure of the sweep
    at.text_area(key="steer_prompt").input("   ").run()
    at.button(key="steer_go").click().run()
    assert any("empty" in e for e in errors(at))


def test_circuits_page(app_test, runs):
    at = app_test
    at.switch_page("views/circuits.py").run()
    assert "saewb circuits" in at.info[0].value  # none computed yet: says how
    assert main(["circuits", "--run-dir", str(runs / "tiny"), "--task", "sva", "--node-threshold", "0.001"]) == 0
    at.switch_page("views/circuits.py").run()
    assert not errors(at)
    assert len(at.get("plotly_chart")) == 2  # graph + faithfulness curve
    assert any("feature?latent=" in m.value for m in at.markdown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(runs, tmp_path):
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false", "--", str(runs)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                            if k != "SAEWB_RUNS_DIR"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("streamlit did not start: " + (tmp_path / "streamlit.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)  # a loaded machine can take a while to stop streamlit
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
        log.close()


def address(page) -> str:
    """The browser's address as the page sees it (Playwright's page.url can miss a history.pushState)."""
    return page.evaluate("location.href")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (install the Debian chromium "
                    "package: `make test` does it where apt-get is available)")
def test_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    wait = 90_000  # ms for every wait below, each given explicitly: a loaded 2-core CI machine is slow

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, timeout=wait, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(wait)  # and for anything not listed here
            page.set_default_navigation_timeout(wait)
            page.goto(f"{server}/runs", timeout=wait)  # a page's own address resolves: no "Page not found"
            expect(page.get_by_role("heading", name="Runs").first).to_be_visible(timeout=wait)
            expect(page.get_by_text("run(s) found")).to_be_visible(timeout=wait)
            assert page.get_by_text("Page not found").count() == 0 and "run=tiny" in address(page)
            page.goto(f"{server}/feature?latent=3", timeout=wait)
            expect(page.get_by_role("heading", name="#3 ")).to_be_visible(timeout=wait)  # '#3 label'
            expect(page.locator("span.tok-on").first).to_be_visible(timeout=wait)
            first = page.locator("details.ctx").first
            first.locator("summary").click(timeout=wait)  # a top context opens to its whole stored window
            expect(first.locator(".ctx-long")).to_be_visible(timeout=wait)
            search = page.get_by_label("Search latents by token, label or explanation")
            search.fill("the", timeout=wait)
            search.press("Enter", timeout=wait)
            expect(page.get_by_text("Latents whose top examples centre on")).to_be_visible(timeout=wait)
            page.screenshot(path=str(tmp_path / "feature.png"), full_page=True, timeout=wait)
            # a latent link opens the latent in the same tab, keeping the run and the search
            page.get_by_role("tab", name="Neighbours").click(timeout=wait)
            link = page.get_by_role("link").filter(has_text=" · cos ").first
            target = link.inner_text(timeout=wait).split()[0]  # '#N'
            link.click(timeout=wait)
            try:
                expect(page.get_by_role("heading", name=f"{target} ")).to_be_visible(timeout=wait)
            finally:
                assert len(page.context.pages) == 1, "the latent link opened another tab"
            page.wait_for_function(f"location.href.includes('latent={target[1:]}')", timeout=wait)
            assert "/feature?" in address(page) and "run=tiny" in address(page)
            expect(search).to_have_value("the", timeout=wait)
            # to the Live page by the sidebar: the text is shaded by the current latent or the strongest on it
            page.get_by_test_id("stSidebarNav").get_by_role("link", name="Live").click(timeout=wait)
            box = page.get_by_label("Text", exact=True)
            box.fill("Emma was very happy at Hartfield.", timeout=wait)
            box.press("Control+Enter", timeout=wait)
            expect(page.get_by_text("Latents firing most on this text")).to_be_visible(timeout=wait)
            expect(page.get_by_text("shaded by").first).to_be_visible(timeout=wait)
            assert page.locator("span.tok").count() >= 6
            assert "run=tiny" in address(page) and len(page.context.pages) == 1
            page.screenshot(path=str(tmp_path / "live.png"), full_page=True, timeout=wait)
            # and back: the Feature page still shows the latent and the search
            page.get_by_test_id("stSidebarNav").get_by_role("link", name="Feature").click(timeout=wait)
            expect(page.get_by_role("heading", name=f"{target} ")).to_be_visible(timeout=wait)
            search = page.get_by_label("Search latents by token, label or explanation")
            expect(search).to_have_value("the", timeout=wait)
            assert len(page.context.pages) == 1
        finally:
            browser.close()
    assert (tmp_path / "live.png").stat().st_size > 10_000


def test_signed_sae_keeps_most_negative_contexts(runs, brute):
    """AbsTopK codes can be negative: the store also keeps the most negative contexts and a negative histogram."""
    from analysis.features import collect
    from saes import build_sae
    from training.activation_store import ActivationCache

    _, keep, _ = brute
    summary = Run(runs / "tiny").summary()
    cache = ActivationCache(summary["cache"])
    sae = build_sae("abstopk", d_in=64, d_sae=32, k=4, selection="per_token")
    out = collect(sae, cache, summary["hook"], FeaturesConfig(run_dir=runs / "tiny", top_n=4, samples=4,
                                                              progress=False))
    acts = torch.cat([cache.read(i, f"acts.{summary['hook']}") for i in range(cache.n_shards)])
    with torch.no_grad():
        codes = sae.encode(acts).float() * keep[:, None]
    assert torch.allclose(out["bottom_values"][:, 0], codes.min(0).values, rtol=1e-5)
    assert torch.allclose(out["top_values"][:, 0].nan_to_num(0), codes.max(0).values.clamp(min=0), rtol=1e-5)
    assert (out["hist"].sum(1) + out["hist_neg"].sum(1)).tolist() == (codes != 0).sum(0).tolist()


def test_an_interrupted_feature_build_leaves_no_store_that_reads_as_valid(runs, tmp_path, monkeypatch):
    import shutil

    import analysis.features as features

    run_dir = tmp_path / "copy"
    shutil.copytree(runs / "tiny", run_dir)
    assert FeatureStore(run_dir / "features").d_sae > 0  # the copied store is valid before the rebuild

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        build_features(FeaturesConfig(run_dir=run_dir, top_n=8, samples=12, progress=False))
    with pytest.raises(ValueError, match="saewb features"):
        FeatureStore(run_dir / "features")
