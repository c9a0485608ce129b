"""Sparse feature circuits (docs/methods.md §10.2) and head-level discovery (§10.1): toy networks and the tiny model."""
import pytest
import torch

from analysis.circuits import (CircuitError, Circuit, ablation_values, attribution_patching, check_hooks,
                               circuit_from_scores, collect_states, edge_effects, evaluate_circuit,
                               exact_error_effect, exact_latent_effect, full_circuit, integrated_gradients, lm_runner)
from analysis.tasks import TaskError, build_split, build_task, evaluate_task, split_task, task_metric
from saes import build_sae
from saes.base import SAE, SAEConfig

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def linear_runner(x, W1, W2, w, tanh=False, mix=None, weights=None):
    """x [batch, seq, d] -> hook a = x W1 -> hook b = (mix @ a) W2 -> m = sum_t weights_t phi(b_t) . w, phi = tanh
    or identity; mix [seq, seq] mixes positions (default identity), weights [seq] (default ones)."""
    def run(replace, stop_at=None):
        a = x @ W1
        a = replace["a"](a) if "a" in replace else a
        b = (a if mix is None else torch.einsum("ts,bsd->btd", mix, a)) @ W2
        b = replace["b"](b) if "b" in replace else b
        out = (torch.tanh(b) if tanh else b) @ w  # [batch, seq]
        return (out if weights is None else out * weights).sum(1)
    return run


class LinearSAE(SAE):
    """An SAE whose codes are its pre-activations (no sparsity), so every derivative through it is a matrix."""

    architecture = "linear-test"

    def select(self, pre_acts, *, train, x_scaled, grad):
        return pre_acts


def linear_sae(seed, d_in, d_sae, input_scale):
    sae = LinearSAE(SAEConfig(d_in=d_in, d_sae=d_sae, input_scale=input_scale), seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    d = 6
    W1, W2, w = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g), torch.randn(d, generator=g)
    x, x_patch = torch.randn(3, 4, d, generator=g), torch.randn(3, 4, d, generator=g)
    saes = {h: build_sae("topk", seed=i, d_in=d, d_sae=12, k=3).requires_grad_(False) for i, h in enumerate("ab")}
    return x, x_patch, W1, W2, w, saes


@pytest.mark.parametrize("error_nodes", ["per_hook", "per_position"])
def test_atp_ig_and_exact_patching_agree_on_a_linear_network(toy, error_nodes):
    x, x_patch, W1, W2, w, saes = toy
    run, run_patch = linear_runner(x, W1, W2, w), linear_runner(x_patch, W1, W2, w)
    states = collect_states(run, run_patch, saes)
    atp = attribution_patching(saes, states, error_nodes)
    ig = integrated_gradients(run, saes, states, steps=3, error_nodes=error_nodes)
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
        # the error nodes' scores are exact patches of the error at every position (per hook) or at one
        exact = (torch.stack([exact_error_effect(run, hook, states)]) if error_nodes == "per_hook" else
                 torch.stack([exact_error_effect(run, hook, states, p) for p in range(4)]))  # [n_error, batch]
        torch.testing.assert_close(atp[hook].error_scores(), exact.mean(1), atol=1e-4, rtol=1e-4)
        assert atp[hook].error_scores().shape == ((1,) if error_nodes == "per_hook" else (4,))
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


@pytest.fixture(scope="module")
def edge_toy():
    """Linear SAEs at hooks a and b of a network that mixes positions and weights them in the metric."""
    g = torch.Generator().manual_seed(1)
    d, seq = 5, 4
    W1, W2, w = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g) / 2, torch.randn(d, generator=g)
    mix, weights = torch.randn(seq, seq, generator=g) / 2, torch.randn(seq, generator=g)
    x, x_patch = torch.randn(3, seq, d, generator=g), torch.randn(3, seq, d, generator=g)
    saes = {"a": linear_sae(0, d, 7, 2.0), "b": linear_sae(1, d, 6, 0.5)}
    return x, x_patch, W1, W2, w, mix, weights, saes


def hand_edges(sae_a, sae_b, dz, de, mix, W2, g, error_nodes):
    """Edges by hand for linear SAEs: a latent i of a moves h_a by dz_i d_i, an error node by de; then
    delta h_b[t] = sum_s mix[t, s] delta h_a[s] W2, delta z_b = s_b W_enc_b delta h_b,
    delta eps_b = delta h_b (I - W_enc_b^T W_dec_b), and the downstream node's gradient is g . d_j (latent j) or g
    (error). dz [batch, seq, n_a], de [batch, seq, d], g [batch, seq, d] -> [n_a + n_err, n_b + n_err]."""
    d_a = sae_a.W_dec / sae_a.input_scale  # [n_a, d]
    d_b = sae_b.W_dec / sae_b.input_scale  # [n_b, d]
    enc_b = sae_b.input_scale * sae_b.W_enc  # [n_b, d]: d z_b / d h_b
    err_b = torch.eye(W2.shape[0]) - sae_b.W_enc.T @ sae_b.W_dec  # [d, d]: d eps_b / d h_b (row vectors)
    moves = torch.cat([dz[..., :, None] * d_a, de[..., None, :]], dim=2)  # [batch, s, n_a + 1, d]
    moved_b = torch.einsum("ts,bsnd,de->bsnte", mix, moves, W2)  # [batch, s_up, node, t_down, d]
    left = (g @ d_b.T)  # [batch, t, n_b]
    into_latents = torch.einsum("bsnte,je,btj->bsnj", moved_b, enc_b, left)  # [batch, s, node_a, n_b]
    into_error = torch.einsum("bsnte,ef,btf->bsnt", moved_b, err_b, g)  # [batch, s, node_a, t]
    n_a = dz.shape[-1]
    rows = []
    for block in (into_latents, into_error):
        latent_rows = block[:, :, :n_a].sum(1)  # [batch, n_a, cols]
        error_rows = block[:, :, n_a]  # [batch, s, cols]
        if error_nodes == "per_hook":
            error_rows = error_rows.sum(1, keepdim=True)
        rows.append(torch.cat([latent_rows, error_rows], 1).mean(0))  # [n_a + n_err, cols]
    latent_cols, error_cols = rows
    if error_nodes == "per_hook":
        error_cols = error_cols.sum(1, keepdim=True)
    return torch.cat([latent_cols, error_cols], 1)


@pytest.mark.parametrize("error_nodes", ["per_hook", "per_position"])
@pytest.mark.parametrize("method", ["atp", "ig"])
def test_edges_match_a_hand_computed_linear_toy(edge_toy, method, error_nodes):
    x, x_patch, W1, W2, w, mix, weights, saes = edge_toy
    tanh = method == "ig"  # after hook b, so the IG gradient there differs from the clean one
    run = linear_runner(x, W1, W2, w, tanh, mix, weights)
    states = collect_states(run, linear_runner(x_patch, W1, W2, w, tanh, mix, weights), saes)
    effects = (integrated_gradients(run, saes, states, steps=4, error_nodes=error_nodes) if method == "ig"
               else attribution_patching(saes, states, error_nodes))
    # the downstream gradient of the estimator, by hand: m = sum_t weights_t phi(h_b[t]) . w
    b_clean, b_patch = states.clean["b"], states.patch["b"]
    if method == "ig":
        path = [(1 - s / 4) * b_clean + s / 4 * b_patch for s in range(4)]
        g = sum(weights[:, None] * (1 - torch.tanh(b) ** 2) * w for b in path) / 4
        g_clean = weights[:, None] * (1 - torch.tanh(b_clean) ** 2) * w
        assert (g - g_clean).abs().max() > 1e-2  # the test can tell IG from clean gradients
    else:
        g = (weights[:, None] * w).expand_as(b_clean)
    torch.testing.assert_close(effects["b"].grad, g, atol=1e-5, rtol=1e-5)
    zc, zp = states.codes["a"]
    ec, ep = states.errors["a"]
    expected = hand_edges(saes["a"], saes["b"], zp - zc, ep - ec, mix, W2, g, error_nodes)
    up, down = list(range(7)), [0, 2, 3, 5]
    edges = edge_effects(run, saes, states, effects, "a", "b", up, down)
    n_err = 1 if error_nodes == "per_hook" else 4
    assert edges.weight.shape == (7 + n_err, 4 + n_err)
    columns = down + list(range(6, 6 + n_err))
    torch.testing.assert_close(edges.weight, expected[:, columns], atol=1e-4, rtol=1e-4)
    assert expected[:7, :6].abs().min() > 1e-4 and expected.sign().unique().numel() == 2  # signs matter
    # every node of a feeds b only through h_b, so the edges into a downstream node add up to its effect
    node_effects = torch.cat([effects["b"].latent_scores()[down], effects["b"].error_scores()])
    torch.testing.assert_close(edges.weight.sum(0), node_effects, atol=1e-4, rtol=1e-4)
    items = list(edges.items())
    assert items[0] == (("latent", 0), ("latent", 0), pytest.approx(edges.weight[0, 0].item()))
    assert items[-1][:2] == (("error", n_err - 1), ("error", n_err - 1))


def test_mean_ablation_uses_the_corrupted_prompts_and_evaluates_held_out_states(edge_toy):
    x, x_patch, W1, W2, w, mix, weights, saes = edge_toy
    run = linear_runner(x, W1, W2, w, True, mix, weights)
    states = collect_states(run, linear_runner(x_patch, W1, W2, w, True, mix, weights), saes, grad=False)
    assert not states.grads
    with pytest.raises(CircuitError, match="without gradients"):
        attribution_patching(saes, states)
    patch_means = ablation_values(saes, states)
    torch.testing.assert_close(patch_means["a"][0], states.codes["a"][1].mean(0, keepdim=True))
    torch.testing.assert_close(patch_means["b"][1], states.errors["b"][1].mean(0, keepdim=True))

    def m_of(b):  # the metric with h_b set to b [1 or batch, seq, d]
        return ((torch.tanh(b) @ w) * weights).sum(1).mean().item()

    circuit = full_circuit(saes)
    for source, side in (("patch", 1), ("clean", 0)):
        result = evaluate_circuit(run, saes, states, circuit, "mean", source)
        # the empty circuit sets every node of b to its mean, so h_b = mean of the chosen side's h_b (decode is affine)
        assert result["m_empty"] == pytest.approx(m_of((states.patch if side else states.clean)["b"].mean(0, keepdim=True)), abs=1e-5)
        assert result["m_full"] == pytest.approx(m_of(states.clean["b"]), abs=1e-5)
        assert result["ablation_source"] == source and result["n_prompts"] == 3
    zero = evaluate_circuit(run, saes, states, circuit, "zero")
    assert zero["ablation_source"] is None
    assert zero["m_empty"] == pytest.approx(m_of((saes["b"].decode(torch.zeros(1, 4, 6)))), abs=1e-5)
    # keeping only hook b's error node: h_b = decode(mean patch codes) + eps_b, eps_b recomputed from the clean a
    # downstream of a fully ablated hook a
    only_error = Circuit({h: torch.zeros(s.cfg.d_sae, dtype=torch.bool) for h, s in saes.items()},
                         {"a": torch.tensor([False]), "b": torch.tensor([True])})
    a_ablated = saes["a"].decode(patch_means["a"][0]) + patch_means["a"][1]  # [1, seq, d]
    h_b = torch.einsum("ts,bsd->btd", mix, a_ablated) @ W2
    error_b = h_b - saes["b"].decode(saes["b"].encode(h_b))
    expected = m_of(saes["b"].decode(patch_means["b"][0]) + error_b)
    assert evaluate_circuit(run, saes, states, only_error)["m_circuit"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(CircuitError, match="ablation_source"):
        ablation_values(saes, states, "mean", "resample")


def test_split_holds_out_distinct_prompts_with_both_answers(tiny_model):
    task = build_task("sva", tiny_model.tokenizer, n=40, seed=3)
    discovery, evaluation = split_task(task, 0.5, seed=3)
    assert (discovery.split, evaluation.split) == ("discovery", "evaluation")
    assert len(discovery) + len(evaluation) == len(task)
    assert not set(discovery.prompts) & set(evaluation.prompts)  # repeated prompts stay on one side
    assert abs(len(evaluation) - len(task) / 2) <= max(map(task.prompts.count, task.prompts))
    for part in (discovery, evaluation):
        rows = [task.prompts.index(p) for p in part.prompts]
        assert torch.equal(part.clean, task.clean[rows]) and torch.equal(part.weights, task.weights[rows])
        assert part.ids[:, 0].unique().numel() == 2  # both " is" and " are" prompts on each side
    again = split_task(task, 0.5, seed=3)
    assert again[1].prompts == evaluation.prompts
    d2, e2 = build_split("sva", tiny_model.tokenizer, 8, 8, seed=0)
    assert len(d2) >= 2 and len(e2) >= 2 and not set(d2.prompts) & set(e2.prompts)
    with pytest.raises(TaskError, match="eval_fraction"):
        split_task(task, 1.0)


@pytest.fixture(scope="module")
def tiny_saes():
    saes = {}
    for i, hook in enumerate(HOOKS):
        fields = {} if i == 0 else {"selection": "per_token"}
        sae = build_sae("topk" if i == 0 else "abstopk", seed=i, d_in=64, d_sae=128, k=8, input_scale=3.0, **fields)
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
        for n_error in (1, seq):
            full = evaluate_circuit(run, tiny_saes, states, full_circuit(tiny_saes, n_error), ablation)
            empty = evaluate_circuit(run, tiny_saes, states, full_circuit(tiny_saes, n_error, keep=False), ablation)
            assert full["faithfulness"] == pytest.approx(1.0) and full["completeness"] == pytest.approx(0.0)
            assert empty["faithfulness"] == pytest.approx(0.0) and empty["completeness"] == pytest.approx(1.0)
    assert full["m_full"] == pytest.approx(states.clean_m.mean().item(), abs=1e-4)
    effects = attribution_patching(tiny_saes, states)
    ig = integrated_gradients(run, tiny_saes, states, steps=2)
    assert set(ig) == set(effects) and ig[HOOKS[0]].latent.shape == (len(tiny_task), seq, 128)
    up, down = HOOKS
    edges = edge_effects(run, tiny_saes, states, ig, up, down, [0, 1, 2], [3, 4])
    assert edges.weight.shape == (4, 3) and torch.isfinite(edges.weight).all()
    circuit = circuit_from_scores(effects, 0.0)
    assert circuit.size() > 0 and circuit.errors[up].shape == (1,)


def test_the_circuit_is_scored_on_held_out_prompts(tiny_model, tiny_saes):
    from analysis.circuit_graph import CircuitsConfig, compute_circuit

    discovery, evaluation = build_split("sva", tiny_model.tokenizer, 8, 8)
    cfg = CircuitsConfig(task="sva", n_prompts=8, n_eval_prompts=8, ig_steps=2, node_threshold=0.0,
                         max_nodes_per_hook=3)
    graph = compute_circuit(tiny_model, tiny_saes, cfg, discovery, evaluation)
    with torch.no_grad():
        held_out = task_metric(tiny_model(evaluation.clean), evaluation).mean().item()
        seen = task_metric(tiny_model(discovery.clean), discovery).mean().item()
    assert graph["evaluation"]["m_full"] == pytest.approx(held_out, abs=1e-4)
    assert graph["evaluation_in_sample"]["m_full"] == pytest.approx(seen, abs=1e-4)
    assert graph["evaluation"]["n_prompts"] == len(evaluation) == graph["split"]["evaluation"]
    assert all(row["n_prompts"] == len(evaluation) and row["m_full"] == graph["evaluation"]["m_full"]
               for row in graph["curve"])
    assert "corrupted" in graph["conventions"]["ablation"] and "per hook" in graph["conventions"]["error_nodes"]
    assert [n["id"] for n in graph["nodes"] if n["kind"] == "error"] == [f"{h}/err" for h in HOOKS]


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
    assert main(["circuits", "--run-dir", str(run_dir), "--task", "sva", "--n-prompts", "8", "--n-eval-prompts", "8",
                 "--ig-steps", "2", "--node-threshold", "0", "--max-nodes-per-hook", "5"]) == 0
    out = capsys.readouterr().out
    assert "faithfulness" in out and "skipped" in out and "held-out" in out and "corrupted" in out
    import json

    graph = json.loads((run_dir / "circuits" / "graph.json").read_text())
    assert graph["nodes"] and graph["edges"] and "does_task" in graph["task"]
    assert graph["split"]["evaluation"] == graph["evaluation"]["n_prompts"] > 0 and graph["conventions"]
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
                 "--node-threshold", "0", "--max-nodes-per-hook", "4", "--error-nodes", "per_position",
                 "--ablation-source", "clean", "--n-eval-prompts", "0"]) == 0
    graph = json.loads((sweep / "circuits" / "graph.json").read_text())
    assert graph["hooks"] == list(tiny_cache_cfg.hooks)
    assert graph["conventions"]["evaluation"].startswith("in-sample") and graph["split"]["evaluation"] == 0
    assert "clean" in graph["conventions"]["ablation"] and graph["evaluation"]["ablation_source"] == "clean"
    errors = [n for n in graph["nodes"] if n["kind"] == "error"]
    assert errors and all(n["id"] == f"{n['hook']}/err{n['position']}" for n in errors)
    hooks_of = {n["id"]: n["hook"] for n in graph["nodes"]}
    assert any(hooks_of[e["source"]] == tiny_cache_cfg.hooks[0] and hooks_of[e["target"]] == tiny_cache_cfg.hooks[1]
               for e in graph["edges"])  # edges between SAE nodes at consecutive hook points


def test_layered_edges_draw_sign_as_colour_and_weight_as_width():
    from analysis.circuit_graph import layered_edges

    graph = {"nodes": [{"id": "a", "order": 0, "rank": 0}, {"id": "b", "order": 0, "rank": 1},
                       {"id": "m", "order": 1, "rank": 0}],
             "edges": [{"source": "a", "target": "m", "weight": 2.0}, {"source": "b", "target": "m", "weight": -1.0}]}
    fig, position = layered_edges(graph, opacity=0.5)
    assert position == {"a": (0, 0), "b": (0, -1), "m": (1, 0)}
    first, second = fig.data
    assert (list(first.x), list(first.y), first.line.color, first.line.width) == ([0, 1], [0, 0], "royalblue", 4.5)
    assert (list(second.x), list(second.y), second.line.color, second.line.width) == ([0, 1], [-1, 0], "crimson", 2.5)
    assert first.opacity == 0.5
