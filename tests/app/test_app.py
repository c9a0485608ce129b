"""The feature store against brute force, every app page under AppTest, and the real server in headless Chromium."""
import json
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


def test_feature_page(app_test):
    at = app_test
    at.query_params["latent"] = "5"
    at.switch_page("views/feature.py").run()
    assert not errors(at)
    assert any(h.value == "Latent 5" for h in at.header)
    assert any("tok-on" in m.value for m in at.markdown)  # highlighted contexts
    assert at.get("plotly_chart")  # histogram
    at.text_input(key="token_query").input("the").run()
    assert not errors(at)
    at.text_input(key="text_query").input("Mr. Woodhouse said").run()
    assert not errors(at)
    assert any("feature?latent=" in m.value and "'Mr'" in m.value for m in at.markdown)
    at.number_input(key="latent").set_value(7).run()
    assert any(h.value == "Latent 7" for h in at.header)


def test_live_page(app_test):
    at = app_test
    at.switch_page("views/live.py").run()
    assert not errors(at)
    at.text_area(key="live_text").input("Emma was very happy.").run()
    assert not errors(at)
    assert any("tok-on" in m.value for m in at.markdown)
    assert any("feature?latent=" in m.value for m in at.markdown)


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
            page.goto(f"{server}/feature?latent=3", timeout=wait)
            expect(page.get_by_text("Latent 3", exact=True)).to_be_visible(timeout=wait)
            expect(page.locator("span.tok-on").first).to_be_visible(timeout=wait)
            search = page.get_by_label("Search latents by token")
            search.fill("the", timeout=wait)
            search.press("Enter", timeout=wait)
            expect(page.get_by_text("Latents whose top examples centre on")).to_be_visible(timeout=wait)
            page.screenshot(path=str(tmp_path / "feature.png"), full_page=True, timeout=wait)
            page.goto(f"{server}/live", timeout=wait)
            box = page.get_by_label("Text")
            box.fill("Emma was very happy at Hartfield.", timeout=wait)
            box.press("Control+Enter", timeout=wait)
            expect(page.locator("span.tok-on").first).to_be_visible(timeout=wait)
            assert page.locator("span.tok").count() >= 6
            page.screenshot(path=str(tmp_path / "live.png"), full_page=True, timeout=wait)
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
