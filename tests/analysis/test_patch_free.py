"""Patch-free dictionary circuits (analysis/patch_free.py, docs/methods.md §10.3) on the tiny model: with a
dictionary at every residual-stream writer, the linear paths (a logit through the frozen final norm, a residual
SAE's latent, an attention-output latent through OV with the pattern fixed, an attention score through QK) are
reproduced exactly by their parts + biases + errors; the MLP term is labelled approximate."""
import json
from pathlib import Path

import pytest
import torch

from analysis.patch_free import (Decomposition, LatentTarget, LogitTarget, ScoreTarget, expand_latent, expand_logit,
                                 expand_score, graph_figure, load_patch_free, rope, save_patch_free, short_hook,
                                 trace_circuit, train_writer_saes, writer_hooks)
from saes import build_sae

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "When Mary and John went to the store, John gave a drink to"
TOL = 1e-4


def random_saes(model, d_sae: int = 96, k: int = 6) -> dict:
    """A random TopK SAE at every writer, with non-zero b_dec / b_enc and an input scale, so biases and errors
    carry real mass."""
    saes = {}
    for i, hook in enumerate(writer_hooks(model)):
        sae = build_sae("topk", seed=i, d_in=model.cfg.d_model, d_sae=d_sae, k=k, input_scale=1.3, hook_name=hook)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            sae.b_dec.copy_(0.05 * torch.randn(model.cfg.d_model, generator=g))
            sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        saes[hook] = sae
    return saes


@pytest.fixture(scope="module")
def prompt(tiny_model):
    return [1] + tiny_model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def dec(tiny_model, prompt):
    return Decomposition(tiny_model, random_saes(tiny_model), prompt)


def test_components_add_up_to_the_residual_stream(dec, tiny_model):
    resid = dec.cache[f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"]
    for t in (0, 5, dec.T - 1):
        ids, vectors = dec.components(t, len(dec.writers))
        assert (vectors.sum(0) - resid[t]).abs().max() < TOL
        assert {i.rsplit("/", 1)[0] for i in ids} == set(dec.writers)  # features, bias and error of every writer
        assert sum("/err@" in i for i in ids) == len(dec.writers) and any("/bias@" in i for i in ids)


def test_logit_direction_through_the_frozen_final_norm_is_exact(dec, tiny_model, prompt):
    io, s = (tiny_model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" Mary", " John"))
    exp = expand_logit(dec, LogitTarget([io, s], [1.0, -1.0], position=-1))
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt]))[0, -1]
    assert exp.value == pytest.approx((logits[io] - logits[s]).item(), abs=1e-6)
    assert abs(exp.total() - exp.value) < TOL  # features + biases + errors of every writer + the unembed bias
    assert exp.exact and len(exp.ids) == len(exp.weights)
    errors = sum(float(w) for i, w in zip(exp.ids, exp.weights) if "/err@" in i)
    assert abs(errors) > 0  # random dictionaries: the error nodes really take a share


def test_residual_sae_latent_is_exact(dec):
    sae = build_sae("topk", seed=9, d_in=dec.cfg.d_model, d_sae=32, k=4, input_scale=0.8)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    for hook in ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"):
        exp = expand_latent(dec, LatentTarget(hook, 3, position=7, sae=sae))
        resid = dec.cache.get(hook)
        if resid is None:  # resid_pre / post are not cached by the decomposition: rebuild from the writers
            upto = dec.residual_upto(hook)
            resid = sum(dec.out[w] for w in dec.writers[:upto])
        with torch.no_grad():
            pre = sae.pre_acts(resid[7:8] * sae.input_scale)[0, 3].item()
        assert exp.value == pytest.approx(pre, abs=1e-5) and abs(exp.total() - pre) < TOL


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_output_latent_through_ov_is_exact(dec, layer):
    hook = f"blocks.{layer}.hook_attn_out"
    sae = dec.saes[hook]
    t = dec.T - 1
    for latent in dec.parts[hook]["codes"][t].nonzero()[:3, 0].tolist():
        exp = expand_latent(dec, LatentTarget(hook, latent, t))
        with torch.no_grad():
            pre = sae.pre_acts(dec.out[hook][t:t + 1] * sae.input_scale)[0, latent].item()
        assert exp.mechanism.startswith("OV") and exp.exact
        assert exp.value == pytest.approx(pre, abs=1e-5) and abs(exp.total() - pre) < TOL
        assert torch.allclose(exp.heads.sum(-1), exp.weights)
        sources = {int(i.split("@")[1]) for i in exp.ids}
        assert sources == set(range(t + 1))  # every source position contributes through the pattern
        allowed = set(dec.writers[:dec.before_attn(layer)])
        assert {i.rsplit("/", 1)[0] for i in exp.ids} == allowed  # only writers before this layer's attention


@pytest.mark.parametrize("layer,head,query,key", [(1, 3, -1, 4), (0, 0, 10, 10), (1, 0, 6, 0)])
def test_attention_score_splits_into_qk_pairs_exactly(dec, layer, head, query, key):
    exp = expand_score(dec, ScoreTarget(layer, head, query, key))
    scores = dec.cache[f"blocks.{layer}.attn.hook_attn_scores"]
    t, s = query % dec.T, key % dec.T
    assert exp.value == pytest.approx(scores[head, t, s].item(), abs=1e-6)
    matrix = exp.pairs["matrix"]
    assert matrix.shape == (len(exp.pairs["query"]), len(exp.pairs["key"]))
    assert abs(float(matrix.sum()) - exp.value) < TOL
    assert abs(exp.total() - exp.value) < TOL  # the half-half node shares keep the sum


def test_rope_reproduces_the_models_rotated_queries(dec):
    q, rot_q = dec.cache["blocks.1.attn.hook_q"], dec.cache["blocks.1.attn.hook_rot_q"]
    cos, sin = dec.cache["blocks.1.attn.hook_cos"], dec.cache["blocks.1.attn.hook_sin"]
    for t in range(dec.T):
        assert (rope(q[t], cos[t], sin[t]) - rot_q[t]).abs().max() < 1e-5


def test_mlp_latent_is_labelled_approximate_and_its_miss_is_a_node(dec):
    hook = "blocks.1.hook_mlp_out"
    t = dec.T - 1
    latent = int(dec.parts[hook]["codes"][t].argmax())
    exp = expand_latent(dec, LatentTarget(hook, latent, t))
    assert not exp.exact and "APPROXIMATE" in exp.mechanism
    assert abs(exp.total() - exp.value) < TOL and exp.approx != 0
    assert {i.rsplit("/", 1)[0] for i in exp.ids} == set(dec.writers[:dec.before_attn(1) + 1])  # attn1 included


def test_trace_circuit_graph_on_briefly_trained_dictionaries(tiny_model, prompt, tmp_path, monkeypatch):
    from training.corpus import token_contexts

    contexts = token_contexts(tiny_model.tokenizer, "austen", 32, 12)  # a few hundred tokens
    saes = train_writer_saes(tiny_model, contexts, d_sae=64, k=4, steps=40)
    io, s = (tiny_model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" Mary", " John"))
    graph = trace_circuit(tiny_model, saes, prompt, LogitTarget([io, s], [1.0, -1.0]), depth=3, top_k=3,
                          max_edges=6)
    root = graph["checks"][0]
    assert root["node"] == "target" and abs(root["sum_of_parts"] - root["value"]) < TOL
    assert all(abs(c["sum_of_parts"] - c["value"]) < TOL for c in graph["checks"])
    assert len(graph["checks"]) > 1  # at least one latent was expanded in turn
    ids = {n["id"] for n in graph["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])
    assert {"latent", "target"} <= {n["kind"] for n in graph["nodes"]}
    for key in ("id", "hook", "order", "kind", "effect", "rank", "label"):  # circuit_graph.py's node fields
        assert all(key in n for n in graph["nodes"])
    json.dumps(graph)
    fig = graph_figure(graph)  # x: only the columns that hold a node, in writer order, the target last
    columns = sorted({n["order"] for n in graph["nodes"]})
    markers = fig.data[-1]
    assert set(markers.x) == set(range(len(columns))) and len(markers.x) == len(graph["nodes"])
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[-1] == "target" and [t for t in ticks[:-1] if t] == [
        short_hook(graph["hooks"][int(o)]) for o in columns[:-1] if float(o).is_integer()]
    score = trace_circuit(tiny_model, saes, prompt, ScoreTarget(1, 2, -1, 3), depth=2, top_k=2)
    assert score["qk_pairs"] and abs(score["checks"][0]["sum_of_parts"] - score["checks"][0]["value"]) < TOL
    # the Circuits page draws a saved patch-free graph
    from streamlit.testing.v1 import AppTest

    from saes import save_sae

    run_dir = tmp_path / "runs" / "pf"
    save_sae(saes["blocks.1.hook_mlp_out"], run_dir)
    save_patch_free(graph, run_dir)
    assert load_patch_free(run_dir)["target"]["label"] == graph["target"]["label"]
    import plotly.io

    saved = plotly.io.from_json((run_dir / "circuits" / "patch_free.plotly.json").read_text())
    assert saved.layout.title.text == graph_figure(graph).layout.title.text
    monkeypatch.setenv("SAEWB_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=90)
    at.run()
    at.switch_page("views/circuits.py").run()
    assert not [e.value for e in at.exception] + [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 1 and any("APPROXIMATION" in c.value for c in at.caption)


def test_patch_free_notebook_on_tiny_model(tmp_path):
    from tests.notebook_runner import outputs_text, run_notebook

    run_dir = tmp_path / "run"
    notebook = run_notebook("patch_free.ipynb", {"MODEL": "tiny", "N_CONTEXTS": 8, "STEPS": 40,
                                                 "RUN_DIR": str(run_dir)})
    text = outputs_text(notebook)
    assert "target:" in text and "all parts" in text and "query" in text
    graph = load_patch_free(run_dir)
    assert graph is not None and all(abs(c["sum_of_parts"] - c["value"]) < TOL for c in graph["checks"])
