"""Evaluations (issue 6): metric definitions, splicing controls, one token mask for every pass, budget curves,
ground-truth and stability metrics, the report card and `saewb eval` on tiny run folders, and errors for bad input."""
import json

import pytest
import torch

import analysis.eval_downstream as eval_downstream
from analysis.eval_synthetic import greedy_matching, matched_cosines
from analysis.evals import (budget, budget_ks, check_model, core_metrics, downstream, eval_activations, eval_contexts,
                            fvu, loss_mask, planted_benchmark, planted_recovery, report_card, stability)
from analysis.splice import replacement, splice
from app.cli import main
from saes import build_sae, load_sae, save_sae
from training.synthetic import make_planted

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path_factory):
    """A sweep folder (TopK and HierarchicalTopK, k=8, seed 0) and a TopK run with seed 1, a few steps each on the
    tiny cache (last shard held out)."""
    from training.run import TrainConfig, train

    root = tmp_path_factory.mktemp("evals")
    common = dict(cache=tiny_cache_cfg, hooks=[HOOK], k=[8], expansion=2, batch_size=256, epochs=1,
                  checkpoint_every=0, wandb="off")
    train(TrainConfig(architectures=["topk", "hierarchical_topk"], run_dir=root / "sweep", **common),
          model=tiny_model, progress=False)
    train(TrainConfig(architectures=["topk"], seed=1, run_dir=root / "seed1", **common), model=tiny_model,
          progress=False)
    return root


@pytest.fixture(scope="module")
def held_out(tiny_cache):
    shards = [tiny_cache.n_shards - 1]
    tokens, special = eval_contexts(tiny_cache, shards, 16)
    return shards, tokens, special


def random_topk(k=8, **fields):
    return build_sae("topk", d_in=64, d_sae=128, k=k, hook_name=HOOK, **fields)


def n_hooks(model) -> int:
    points = {id(point): point for point in model.hook_dict.values()}  # some hook points have two names
    return sum(len(point.fwd_hooks) for point in points.values())


def test_fvu_is_zero_for_perfect_reconstruction_and_one_for_the_mean():
    x = torch.randn(500, 16) * torch.linspace(0.1, 3, 16) + 2.0
    assert fvu(x, x) == pytest.approx(0.0, abs=1e-12)
    assert fvu(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0, abs=1e-9)


def test_ce_recovered_is_one_with_the_error_term_and_zero_with_zero_ablation(tiny_model, held_out):
    _, tokens, special = held_out
    sae = random_topk()
    identity = downstream(tiny_model, sae, HOOK, tokens, special, sae_mode="sae_with_error")
    assert identity["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert identity["delta_lm_loss"] == pytest.approx(0.0, abs=1e-4) and identity["kl_sae"] < 1e-6
    assert identity["ce_zero"] != pytest.approx(identity["ce_clean"], abs=1e-3)
    zeroed = downstream(tiny_model, sae, HOOK, tokens, special, sae_mode="zero")
    assert zeroed["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zeroed["kl_score"] == pytest.approx(0.0, abs=1e-6)


def test_every_pass_scores_the_same_token_mask(tiny_model, held_out, monkeypatch):
    _, tokens, special = held_out
    special = special.clone()
    special[:, 5] = special[:, 20] = True  # extra "special" tokens: masked as inputs and as targets
    masks = []
    real = eval_downstream.pass_scores

    def spy(logits, targets, mask, clean_logp):
        masks.append(mask.clone())
        return real(logits, targets, mask, clean_logp)

    monkeypatch.setattr(eval_downstream, "pass_scores", spy)
    sae = random_topk()
    result = downstream(tiny_model, sae, HOOK, tokens, special, mean=torch.zeros(64), ks=[2, 4, 8], batch_size=16)
    expected = loss_mask(special)
    assert len(masks) == 4 + 2  # clean, sae, zero, mean + budgets 2 and 4 (k=8 is the SAE pass), one batch
    assert all(torch.equal(m, expected) for m in masks)
    assert not expected[:, 4].any() and not expected[:, 5].any()
    # the clean CE is the plain masked mean NLL of the model
    logp = tiny_model(tokens)[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    assert result["ce_clean"] == pytest.approx(nll[expected].mean().item(), rel=1e-5)
    assert result["ce_mean"] == pytest.approx(result["ce_zero"], rel=1e-6)  # mean = 0 here: same edit, same mask
    assert result["budget"][8]["ce_sae"] == pytest.approx(result["ce_sae"], rel=1e-6)


def test_hooks_are_removed_after_an_exception(tiny_model, held_out):
    tokens = held_out[1][:2]
    clean = tiny_model(tokens)
    before = n_hooks(tiny_model)
    for mode, kwargs in [("zero", {}), ("sae", {"sae": random_topk()}), ("mean", {"mean": torch.ones(64)})]:
        with pytest.raises(RuntimeError, match="boom"):
            with splice(tiny_model, HOOK, mode, **kwargs):
                assert n_hooks(tiny_model) == before + 1
                assert not torch.allclose(tiny_model(tokens), clean)
                raise RuntimeError("boom")
        assert n_hooks(tiny_model) == before
        assert torch.equal(tiny_model(tokens), clean)


def test_latent_edit_keeps_the_error_term(tiny_model, held_out):
    sae = random_topk()
    h = torch.randn(2, 5, 64)
    same = replacement("sae_with_error", sae, edit=lambda z: z)(h)
    assert torch.allclose(same, h, atol=1e-5)
    codes = sae.encode(h)
    ablated = replacement("sae_with_error", sae, edit=torch.zeros_like)(h)
    assert torch.allclose(ablated, h - sae.decode(codes) + sae.decode(torch.zeros_like(codes)), atol=1e-5)
    tokens = held_out[1][:2]
    clean = tiny_model(tokens)
    with splice(tiny_model, HOOK, "sae_with_error", sae, edit=lambda z: z):
        assert torch.allclose(tiny_model(tokens), clean, atol=1e-4)
    with splice(tiny_model, HOOK, "sae_with_error", sae, edit=lambda z: 3 * z):
        assert not torch.allclose(tiny_model(tokens), clean, atol=1e-2)
    with pytest.raises(ValueError, match="needs an SAE"):
        replacement("zero", edit=lambda z: z)


def test_l0_of_topk_equals_k_and_signed_codes_count_nonzero(tiny_cache, held_out):
    shards = held_out[0]
    result = core_metrics(random_topk(k=8), eval_activations(tiny_cache, HOOK, shards), ks=[2, 4, 16])
    assert result["metrics"]["l0"] == pytest.approx(8.0)
    assert [result["budget"][k]["l0"] for k in (2, 4, 16)] == pytest.approx([2.0, 4.0, 16.0])
    assert result["l0_counts"][8] == result["metrics"]["tokens"]
    signed = build_sae("abstopk", d_in=64, d_sae=128, k=8, hook_name=HOOK, selection="per_token")
    x = next(iter(eval_activations(tiny_cache, HOOK, shards)))
    codes = signed.encode(x)
    assert bool((codes < 0).any())
    out = core_metrics(signed, [x])
    assert out["metrics"]["l0"] == pytest.approx(8.0)
    assert out["metrics"]["l1"] == pytest.approx(codes.abs().sum(-1).mean().item(), rel=1e-5)
    assert torch.allclose(out["density"], (codes != 0).float().mean(0))


def test_hierarchical_budget_curve_equals_topk_with_the_same_weights(tiny_cache, held_out, tmp_path):
    shards = held_out[0]
    save_sae(build_sae("hierarchical_topk", d_in=64, d_sae=128, k_max=16, hook_name=HOOK, seed=3), tmp_path)
    hier = load_sae(tmp_path)  # from a checkpoint folder
    assert budget_ks(hier) == [1, 2, 4, 8, 16] and budget_ks(random_topk(k=8)) == [1, 2, 4, 8, 16]
    x = next(iter(eval_activations(tiny_cache, HOOK, shards)))
    curve = core_metrics(hier, [x], ks=[1, 4, 16])["budget"]
    for k in (1, 4, 16):
        topk = random_topk(k=k)
        topk.load_state_dict(hier.state_dict())
        with budget(hier, k) as view:
            assert torch.equal(view.decode(view.encode(x)), topk.decode(topk.encode(x)))
        assert curve[k]["fvu"] == pytest.approx(core_metrics(topk, [x])["metrics"]["fvu"], rel=1e-12)
        assert curve[k]["l0"] == pytest.approx(k)
    assert hier.cfg.k is None  # the view never touched the SAE itself
    plain = random_topk(k=8)
    with pytest.raises(RuntimeError), budget(plain, 2):
        assert plain.cfg.k == 2
        raise RuntimeError
    assert plain.cfg.k == 8
    with pytest.raises(ValueError, match="no inference budget"):
        with budget(build_sae("relu_l1", d_in=64, d_sae=128), 4):
            pass


def test_planted_recovery_and_stability():
    planted = make_planted(d=32, n_true=64, seed=0)
    truth = planted_recovery(planted.directions, planted.directions)
    assert truth["mean_best_cosine"] == pytest.approx(1.0, abs=1e-5) and truth["fraction_recovered"] == 1.0
    noise = planted_recovery(torch.randn(128, 32, generator=torch.Generator().manual_seed(1)), planted.directions)
    assert noise["fraction_recovered"] < 0.1 and noise["mean_best_cosine"] < 0.8
    true_sae = build_sae("topk", d_in=32, d_sae=64, k=8)
    with torch.no_grad():
        true_sae.W_dec.copy_(planted.directions)
        true_sae.W_enc.copy_(planted.directions)
    bench = planted_benchmark(true_sae, planted, n_tokens=2048)
    assert bench["fraction_recovered"] == 1.0 and bench["l0"] <= 8 and 0 <= bench["fvu"] < 1
    assert planted_benchmark(build_sae("topk", d_in=32, d_sae=64, k=8, seed=5), planted)["fraction_recovered"] < 0.1
    W = random_topk().W_dec.detach()
    assert stability(W, W)["mean_matched_cosine"] == pytest.approx(1.0, abs=1e-6)
    perm = torch.randperm(len(W), generator=torch.Generator().manual_seed(0))
    assert stability(W, -W[perm])["fraction_matched"] == 1.0  # order and sign do not matter
    other = build_sae("topk", d_in=64, d_sae=128, k=8, seed=7).W_dec.detach()
    assert stability(W, other)["mean_matched_cosine"] < 0.6


def test_greedy_matching_is_one_to_one_and_finds_a_permutation():
    sims = torch.rand(6, 9, generator=torch.Generator().manual_seed(0))
    rows, cols = greedy_matching(sims)
    assert len(set(rows.tolist())) == len(set(cols.tolist())) == 6
    W = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    assert matched_cosines(W, W[perm], method="greedy").min().item() == pytest.approx(1.0, abs=1e-6)
    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="scipy"):
            matched_cosines(W, W, method="hungarian")


def test_cli_eval_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["eval", str(runs / "sweep"), str(runs / "seed1"), "--out", str(out), "--max-contexts", "16"]) == 0
    text = capsys.readouterr().out
    assert "CE loss recovered" in text and "dLM loss" in text and "stability" in text
    sweep = sorted(p.name for p in (runs / "sweep").iterdir() if (p / "eval" / "metrics.json").is_file())
    assert sweep == ["hierarchical_topk-k8-blocks_1_hook_resid_post", "topk-k8-blocks_1_hook_resid_post"]
    topk_dir = runs / "sweep" / sweep[1]
    card = json.loads((topk_dir / "eval" / "metrics.json").read_text())
    assert card["core"]["l0"] == pytest.approx(8.0) and 0 < card["core"]["fvu"] < 1
    assert card["eval"]["split"] == "held-out shards" and card["eval"]["contexts"] == 16
    summary = json.loads((topk_dir / "summary.json").read_text())
    assert card["core"]["fvu"] == pytest.approx(summary["fvu"], rel=1e-5)  # same held-out tokens as training's eval
    d = card["downstream"]
    assert d["ce_zero"] != d["ce_clean"] and d["delta_lm_loss"] == pytest.approx(d["ce_sae"] - d["ce_clean"])
    assert [row["k"] for row in card["budget"]] == [1, 2, 4, 8, 16]
    row8 = card["budget"][3]
    assert row8["fvu"] == pytest.approx(card["core"]["fvu"]) and row8["ce_sae"] == pytest.approx(d["ce_sae"])
    assert card["budget"][-1]["above_trained_k"] and not row8["above_trained_k"]
    hier = json.loads((runs / "sweep" / sweep[0] / "eval" / "metrics.json").read_text())
    assert [row["k"] for row in hier["budget"]] == [1, 2, 4, 8]
    for name in ("density_histogram", "l0_histogram", "budget_curve"):
        figure = json.loads((topk_dir / "eval" / "figures" / f"{name}.json").read_text())
        assert figure["data"], name
    for name in ("table.csv", "table.md", "cards.json", "stability.csv", "report.html"):
        assert (out / name).is_file(), name
    lines = (out / "table.csv").read_text().splitlines()
    assert "FVU" in lines[0] and "delta LM loss" in lines[0] and len(lines) == 4
    assert "| run |" in (out / "table.md").read_text() and "Stability across seeds" in (out / "table.md").read_text()
    stab = (out / "stability.csv").read_text().splitlines()
    assert len(stab) == 2 and "seed1" in stab[1] and "topk-k8" in stab[1]
    labels = ["seed1", f"sweep/{sweep[0]}", f"sweep/{sweep[1]}"]
    fig = json.loads((out / "figures" / "fvu_vs_l0.json").read_text())
    assert sorted(t["name"] for t in fig["data"]) == sorted(labels + ["Pareto front"])
    fig = json.loads((out / "figures" / "budget_curves.json").read_text())
    assert sorted({t["name"] for t in fig["data"]}) == sorted(labels) and len(fig["data"]) == 6
    for name in ("fvu_vs_l0", "delta_lm_loss_vs_l0", "dead_latents", "budget_curves"):
        assert (out / "figures" / f"{name}.json").is_file() and (out / "figures" / f"{name}.html").is_file()


def test_bad_inputs_name_the_fix(tiny_model, tiny_cache, runs, held_out, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 1
    assert "has no SAE weights" in capsys.readouterr().err
    run = runs / "seed1"
    for name, fields in [("hook", {"hook_name": "blocks.0.hook_attn_out"}), ("width", {"d_in": 32})]:
        folder = tmp_path / name
        folder.mkdir()
        for file in ("config.json", "summary.json"):
            (folder / file).write_text((run / file).read_text())
        save_sae(build_sae("topk", **({"d_in": 64, "d_sae": 128, "k": 4, "hook_name": HOOK} | fields)), folder)
        with pytest.raises(ValueError, match="cache"):
            report_card(folder, model=tiny_model)
    _, tokens, special = held_out
    with pytest.raises(ValueError, match="width 64 but the SAE has d_in=32"):
        check_model(tiny_model, build_sae("topk", d_in=32, d_sae=64, k=4), HOOK, tokens)
    with pytest.raises(ValueError, match="at least"):
        core_metrics(random_topk(), [torch.randn(10, 64)])
    with pytest.raises(ValueError, match="max-contexts"):
        downstream(tiny_model, random_topk(), HOOK, tokens[:1, :8], special[:1, :8])
    with pytest.raises(ValueError, match="no hook"):
        downstream(tiny_model, random_topk(), "blocks.7.hook_resid_post", tokens, special)
    with pytest.raises(ValueError, match="max-contexts"):
        report_card(run, model=tiny_model, max_contexts=0)
    with pytest.raises(ValueError, match="scored positions"):
        report_card(run, model=tiny_model, max_contexts=1, write=False)
