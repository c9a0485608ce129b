"""Sparse feature circuits (algorithms.md §10.2) and head-level discovery (§10.1): toy networks and the tiny model."""
import pytest
import torch

from analysis.circuits import (CircuitError, attribution_patching, check_hooks, circuit_from_scores, collect_states,
                               edge_effects, evaluate_circuit, exact_error_effect, exact_latent_effect,
                               full_circuit, integrated_gradients, lm_runner)
from analysis.tasks import TaskError, build_task, evaluate_task
from saes import build_sae

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def linear_runner(x, W1, W2, w, tanh=False):
    """x [batch, seq, d] -> hook a = x W1 -> hook b = a W2 -> m = sum_seq b . w (optionally tanh after a)."""
    def run(replace, stop_at=None):
        a = x @ W1
        a = replace["a"](a) if "a" in replace else a
        b = (torch.tanh(a) if tanh else a) @ W2
        b = replace["b"](b) if "b" in replace else b
        return (b @ w).sum(1)
    return run


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    d = 6
    W1, W2, w = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g), torch.randn(d, generator=g)
    x, x_patch = torch.randn(3, 4, d, generator=g), torch.randn(3, 4, d, generator=g)
    saes = {h: build_sae("topk", seed=i, d_in=d, d_sae=12, k=3).requires_grad_(False) for i, h in enumerate("ab")}
    return x, x_patch, W1, W2, w, saes


def test_atp_ig_and_exact_patching_agree_on_a_linear_network(toy):
    x, x_patch, W1, W2, w, saes = toy
    run, run_patch = linear_runner(x, W1, W2, w), linear_runner(x_patch, W1, W2, w)
    states = collect_states(run, run_patch, saes)
    atp = attribution_patching(saes, states)
    ig = integrated_gradients(run, saes, states, steps=3)
    for hook in "ab":
        torch.testing.assert_close(atp[hook].latent, ig[hook].latent, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(atp[hook].error, ig[hook].error, atol=1e-4, rtol=1e-4)
        scores = atp[hook].latent.sum(1)  # [batch, d_sae]
        for latent in range(12):
            exact = exact_latent_effect(run, saes[hook], hook, states, latent)
            torch.testing.assert_close(scores[:, latent], exact, atol=1e-4, rtol=1e-4)
        for position in range(4):
            exact = exact_error_effect(run, hook, states, position)
            torch.testing.assert_close(atp[hook].error[:, position], exact, atol=1e-4, rtol=1e-4)
    # the total effect of patching every node of a hook is the effect of patching the hook
    total = atp["a"].latent.sum((1, 2)) + atp["a"].error.sum(1)
    torch.testing.assert_close(total, states.patch_m - states.clean_m, atol=1e-4, rtol=1e-4)


def test_ig_converges_to_the_exact_effect_on_a_smooth_toy(toy):
    x, x_patch, W1, W2, w, saes = toy
    run, run_patch = linear_runner(x, W1, W2, w, tanh=True), linear_runner(x_patch, W1, W2, w, tanh=True)
    states = collect_states(run, run_patch, {"a": saes["a"]})
    exact = states.patch_m - states.clean_m
    errors = []
    for steps in (1, 64):
        ig = integrated_gradients(run, {"a": saes["a"]}, states, steps=steps)["a"]
        errors.append((ig.latent.sum((1, 2)) + ig.error.sum(1) - exact).abs().max().item())
    assert errors[1] < 0.05 * max(errors[0], 1e-6) + 1e-3 and errors[1] < errors[0]


def test_edges_of_a_linear_network_are_chain_rule_products(toy):
    x, x_patch, W1, W2, w, saes = toy
    run, run_patch = linear_runner(x, W1, W2, w), linear_runner(x_patch, W1, W2, w)
    states = collect_states(run, run_patch, saes)
    latent_edges, error_edges = edge_effects(run, saes, states, "a", "b", list(range(12)), [0, 1, 2])
    assert latent_edges.shape == (12, 3) and error_edges.shape == (4, 3)
    assert torch.isfinite(latent_edges).all() and latent_edges.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_saes():
    saes = {}
    for i, hook in enumerate(HOOKS):
        sae = build_sae("topk" if i == 0 else "abstopk", seed=i, d_in=64, d_sae=128, k=8, input_scale=3.0)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.1)
        saes[hook] = sae.requires_grad_(False)
    return saes


@pytest.fixture(scope="module")
def tiny_task(tiny_model):
    return build_task("sva", tiny_model.tokenizer, n=8)


def test_splicing_saes_with_error_nodes_leaves_logits_unchanged(tiny_model, tiny_saes, tiny_task):
    run = lm_runner(tiny_model, tiny_task.clean, tiny_task)
    plain = run({})
    with torch.no_grad():
        spliced = run({h: (lambda h, s=s: s.decode(s.encode(h)) + (h - s.decode(s.encode(h)))) for h, s in tiny_saes.items()})
    torch.testing.assert_close(spliced, plain, atol=1e-5, rtol=1e-5)


def test_faithfulness_is_one_for_the_full_model_and_zero_for_the_empty_circuit(tiny_model, tiny_saes, tiny_task):
    run, run_patch = lm_runner(tiny_model, tiny_task.clean, tiny_task), lm_runner(tiny_model, tiny_task.patch, tiny_task)
    states = collect_states(run, run_patch, tiny_saes)
    seq = tiny_task.clean.shape[1]
    for ablation in ("mean", "zero"):
        full = evaluate_circuit(run, tiny_saes, states, full_circuit(tiny_saes, seq), ablation)
        empty = evaluate_circuit(run, tiny_saes, states, full_circuit(tiny_saes, seq, keep=False), ablation)
        assert full["faithfulness"] == pytest.approx(1.0) and full["completeness"] == pytest.approx(0.0)
        assert empty["faithfulness"] == pytest.approx(0.0) and empty["completeness"] == pytest.approx(1.0)
    assert full["m_full"] == pytest.approx(states.clean_m.mean().item(), abs=1e-4)
    effects = attribution_patching(tiny_saes, states)
    ig = integrated_gradients(run, tiny_saes, states, steps=2)
    assert set(ig) == set(effects) and ig[HOOKS[0]].latent.shape == (len(tiny_task), seq, 128)
    up, down = HOOKS
    latent_edges, _ = edge_effects(run, tiny_saes, states, up, down, [0, 1, 2], [3, 4])
    assert latent_edges.shape == (3, 2) and torch.isfinite(latent_edges).all()
    circuit = circuit_from_scores(effects, 0.0)
    assert circuit.size() > 0


def test_bad_inputs_say_how_to_fix_them(tiny_model, tiny_saes):
    with pytest.raises(CircuitError, match="no hook"):
        check_hooks(tiny_model, {"blocks.9.hook_resid_post": tiny_saes[HOOKS[0]]})
    assert check_hooks(tiny_model, dict(reversed(list(tiny_saes.items())))) == HOOKS
    with pytest.raises(TaskError, match="Unknown task"):
        build_task("docstring", tiny_model.tokenizer)
    report = evaluate_task(tiny_model, build_task("ioi", tiny_model.tokenizer, n=8))
    assert report["n_skipped"] > 0 and isinstance(report["does_task"], bool) and report["message"]
    if not report["does_task"]:
        assert "does NOT do" in report["message"]


class WordTokenizer:
    """Every word a single token except those in `split`."""
    eos_token_id, bos_token_id = 0, 1

    def __init__(self, split):
        self.split, self.vocab = split, {}

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.replace(",", " ,").split(" "):
            if word:
                ids += [self.vocab.setdefault(p, len(self.vocab) + 2) for p in ([word[:1], word[1:]] if word in self.split else [word])]
        return {"input_ids": ids}


def test_multi_token_names_are_skipped_and_counted():
    task = build_task("ioi", WordTokenizer({"Mary", "John"}), n=6)
    assert task.skipped.get("Mary") == 1 and task.skipped.get("John") == 1
    assert all("Mary" not in p for p in task.prompts)
    with pytest.raises(TaskError, match="cannot be expressed"):
        build_task("sva", WordTokenizer({"is", "are"}), n=4)


def test_a_planted_head_gets_the_top_head_level_score():
    from analysis.circuit_heads import best_f1, head_discovery, node_scores, planted_head_data, roc_auc

    outputs, positive = planted_head_data(n=20, n_heads=12, planted=5)
    names = [f"{h // 4}.{h % 4}" for h in range(12)]
    result = head_discovery(outputs, positive, names, truth={"1.1"}, d_sae=32, k=2, steps=150, n_train=10)
    assert result["ranking"][0] == "1.1" and result["scores"][5] > max(result["scores"][:5] + result["scores"][6:])
    assert result["roc_auc"] == 1.0 and result["best_f1"] == 1.0
    codes = torch.randint(0, 5, (10, 3))
    assert node_scores(torch.cat([codes, codes]), torch.arange(20) < 10).eq(0).all()  # identical pos/neg: all 0
    assert roc_auc(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, False])) == 1.0
    assert best_f1(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, True])) == 1.0
    assert result["edge_ranking"][0] == "1.1"  # every pair with the planted head separates positives


def test_edge_scores_are_symmetric_and_find_a_planted_pair():
    from analysis.circuit_heads import edge_scores, heads_from_edges

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (40, 6), generator=generator)
    codes[20:] = codes[:20]  # negatives repeat the positives' codes exactly...
    positive = torch.arange(40) < 20
    assert edge_scores(codes, positive).eq(0).all()  # ...so no pair separates them
    codes[:20, 2], codes[:20, 4] = 7, 8  # heads 2 and 4 jointly take codes seen only on positives
    scores = edge_scores(codes, positive)
    assert torch.equal(scores, scores.T) and scores.diagonal().eq(0).all()
    assert scores[2, 4] == 1  # one new code pair, (7, 8)
    # with any other head x, head 2's new code 7 makes one new pair per code x takes on positives
    assert scores[2, 0] == len(set(codes[:20, 0].tolist())) and scores[0, 1] == 0
    counts = heads_from_edges(scores)
    assert set(counts.argsort(descending=True)[:2].tolist()) == {2, 4}


def test_head_outputs_of_the_tiny_model(tiny_model, tiny_task):
    from analysis.circuit_heads import head_outputs

    outputs, names = head_outputs(tiny_model, tiny_task.clean)
    assert outputs.shape == (len(tiny_task), 8, 16) and names[:2] == ["0.0", "0.1"]


def test_cli_writes_the_circuit_and_reports_bad_thresholds(tmp_path, tiny_model, capsys):
    from app.cli import main

    run_dir = tmp_path / "run"
    assert main(["demo", "--model", "tiny", "--tokens", "8192", "--run-dir", str(run_dir)]) == 0
    assert main(["circuits", "--run-dir", str(run_dir), "--task", "sva", "--n-prompts", "8", "--ig-steps", "2",
                 "--node-threshold", "0", "--max-nodes-per-hook", "5"]) == 0
    out = capsys.readouterr().out
    assert "faithfulness" in out and "skipped" in out
    import json

    graph = json.loads((run_dir / "circuits" / "graph.json").read_text())
    assert graph["nodes"] and graph["edges"] and "does_task" in graph["task"]
    assert (run_dir / "circuits" / "graph.html").is_file() and (run_dir / "circuits" / "graph.plotly.json").is_file()
    assert main(["circuits", "--run-dir", str(run_dir), "--task", "sva", "--n-prompts", "8", "--method", "atp",
                 "--node-threshold", "1e9"]) == 1
    assert "selects no node" in capsys.readouterr().err
    assert main(["circuits", "--run-dir", str(run_dir), "--task", "docstring"]) == 1
    assert "Unknown task" in capsys.readouterr().err


def test_cli_spans_the_hooks_of_saes_trained_together(tmp_path, tiny_model, tiny_cache_cfg):
    import json

    from app.cli import main
    from training.run import TrainConfig, train

    sweep = tmp_path / "sweep"
    train(TrainConfig(cache=tiny_cache_cfg, hooks=list(tiny_cache_cfg.hooks), k=[8], expansion=2, batch_size=256,
                      checkpoint_every=0, wandb="off", run_dir=sweep), model=tiny_model, progress=False)
    assert main(["circuits", "--run-dir", str(sweep), "--task", "sva", "--n-prompts", "8", "--ig-steps", "2",
                 "--node-threshold", "0", "--max-nodes-per-hook", "4"]) == 0
    graph = json.loads((sweep / "circuits" / "graph.json").read_text())
    assert graph["hooks"] == list(tiny_cache_cfg.hooks)
    hooks_of = {n["id"]: n["hook"] for n in graph["nodes"]}
    assert any(hooks_of[e["source"]] == tiny_cache_cfg.hooks[0] and hooks_of[e["target"]] == tiny_cache_cfg.hooks[1]
               for e in graph["edges"])  # edges between SAE nodes at consecutive hook points
