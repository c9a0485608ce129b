"""The Runs, Steering and Circuits pages under AppTest on a tiny demo run: the report card with its intervals and a
rendered comparison; steering progress, every α side by side, escaped output and a bad-α message; a circuit found
from the page."""
import json
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app" / "streamlit_app.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with one tiny demo run (report card, feature store) and the comparison `saewb eval` writes."""
    from analysis.eval_compare import write_comparison

    root = tmp_path_factory.mktemp("pages")
    run_dir = root / "tiny"
    assert main(["demo", "--model", "tiny", "--tokens", "16384", "--run-dir", str(run_dir)]) == 0
    card = json.loads((run_dir / "eval" / "metrics.json").read_text())
    write_comparison([card], root / "comparison", ["tiny"])
    return root


@pytest.fixture
def app(runs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEWB_RUNS_DIR", str(runs))
    return AppTest.from_file(str(APP), default_timeout=300)


def errors(at) -> list[str]:
    return [e.value for e in at.exception] + [e.value for e in at.error]


def elements(at, kind: str) -> list:
    """Every element of a type anywhere in the page tree (containers such as st.status included)."""
    found, stack = [], [at._tree]
    while stack:
        node = stack.pop()
        if getattr(node, "type", None) == kind:
            found.append(node)
        stack.extend(getattr(node, "children", {}).values())
    return found


def test_runs_page_shows_the_report_card_with_intervals_and_the_comparison(app):
    at = app.run()
    assert not errors(at)
    metrics = {m.label: m.value for m in at.metric}
    for label in ("FVU (with outliers)", "CE loss recovered", "KL score", "ΔLM loss", "Dead latents (%)",
                  "Dense >1% (%)"):
        assert label in metrics and metrics[label] != "-", label
    captions = [c.value for c in at.caption]
    assert sum(c.startswith("95% interval [") for c in captions) >= 8  # the headline numbers' bootstrap intervals
    assert "Report card" in [s.value for s in at.subheader]
    # the comparison: its table (metrics as rows, 'value [low, high]') and figures, not cards.json as raw JSON
    assert any(s.value.startswith("Comparison") for s in at.subheader)
    tables = [d.value for d in at.dataframe]
    comparison = next(t for t in tables if "FVU (with outliers)" in t.index)
    assert list(comparison.columns) == ["tiny"] and "[" in comparison.loc["FVU (with outliers)", "tiny"]
    specs = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert any("FVU vs L0" in spec for spec in specs) and any("Dead latents" in spec for spec in specs)
    assert not any('"ce_loss_recovered"' in j.value for j in at.json if "cards" in j.value)
    # every training curve has axis titles
    curves = json.loads(specs[0])
    axes = {k: v for k, v in curves["layout"].items() if k.startswith(("xaxis", "yaxis"))}
    assert axes and all(v.get("title", {}).get("text") for v in axes.values())
    assert {"step", "L0 (latents per token)"} <= {v["title"]["text"] for v in axes.values()}
    # the config as a table of settings
    settings = next(t for t in tables if list(t.columns) == ["setting", "value"])
    assert "cache.model" in set(settings["setting"]) and "tiny" in set(settings["value"])


def test_steering_page_shows_progress_every_alpha_side_by_side_and_escapes_output(app):
    at = app
    at.query_params["latent"] = "3"
    at.switch_page("views/steering.py").run()
    assert not errors(at)
    assert at.text_input(key="steer_alphas").value == "4, 8" and at.slider(key="steer_tokens").value == 12
    at.text_input(key="steer_alphas").input("0, 4, 8").run()
    at.slider(key="steer_tokens").set_value(3).run()
    at.text_area(key="steer_prompt").input("# Heading *not bold* [link](x) $x$\n\n- item").run()
    at.text_input(key="steer_target").input(" the").run()
    at.button(key="steer_go").click().run()
    assert not errors(at)
    assert elements(at, "progress"), "no progress bar"
    status = [e for e in elements(at, "status") if "Steered 3 value(s) of α" in e.proto.label]
    assert status, "no completed status box"
    done = [m.value for m in at.markdown if m.value.endswith(": done")]
    assert done == ["α = 0: done", "α = 4: done", "α = 8: done"]  # progress reported per α
    titles = [m.value for m in at.markdown if m.value.startswith("**")]
    assert titles[:4] == ["**Unsteered**", "**additive, α = 0**", "**additive, α = 4**", "**additive, α = 8**"]
    assert len(elements(at, "column")) >= 4  # the continuations side by side
    texts = [m.value for m in at.markdown if m.value.startswith('<div style="white-space:pre-wrap')]
    assert len(texts) == 4
    for text in texts:  # the prompt (and whatever the model wrote) cannot break the markdown
        assert "&#35; Heading &#42;not bold&#42; &#91;link&#93;&#40;x&#41; &#36;x&#36;<br><br>&#45; item" in text
        assert "<|" not in text and "\n" not in text
    table = at.dataframe[0].value
    assert list(table["alpha"]) == [0.0, 4.0, 8.0] and table["kl"][0] == pytest.approx(0, abs=1e-6)
    assert "target_logprob_change" in table.columns and table["target_logprob_change"][0] == pytest.approx(0, abs=1e-6)
    assert any("target token" in c.value for c in at.caption)
    for bad, message in (("4, abc", "is not a number"), ("inf", "finite"), (" , ", "at least one value")):
        at.text_input(key="steer_alphas").input(bad).run()
        at.button(key="steer_go").click().run()
        assert any(message in e for e in errors(at)), (bad, errors(at))


def test_circuits_page_finds_a_circuit_for_a_task(app, runs):
    at = app
    at.switch_page("views/circuits.py").run()
    assert not errors(at) and "saewb circuits" in at.info[0].value  # none yet: says how, and offers the button
    at.selectbox(key="circuit_task").set_value("sva").run()
    at.number_input(key="circuit_prompts").set_value(8).run()
    at.number_input(key="circuit_threshold").set_value(0.001).run()
    at.button(key="circuit_go").click().run()
    assert not errors(at)
    graph = json.loads((runs / "tiny" / "circuits" / "graph.json").read_text())  # written as `saewb circuits` does
    assert graph["task"]["task"] == "sva" and graph["evaluation"]["n_nodes"] > 0
    assert any("found in" in e.proto.label for e in elements(at, "status"))
    assert any(m.value.startswith("Node effects (integrated gradients") for m in at.markdown)  # stage progress
    assert not at.info and len(at.get("plotly_chart")) == 2  # the graph and the faithfulness curve
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    labels = [a["text"] for a in figure["layout"]["annotations"]]
    latents = [n for n in graph["nodes"] if n["kind"] == "latent"]
    assert latents and all(n["token"] == graph["tokens"][n["position"]] for n in latents)
    assert any(f"#{latents[0]['latent']}" in label and f"@{latents[0]['position']}" in label for label in labels)
    assert all(a.get("bgcolor") for a in figure["layout"]["annotations"])  # boxed labels drawn above the edges
    assert any("Negative (red)" in c.value for c in at.caption)  # the sign of effects explained
    assert any("Token positions" in m.value for m in at.markdown)
    assert any("feature?latent=" in m.value for m in at.markdown)
