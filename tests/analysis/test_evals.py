"""Evaluations (issue 6, issue 13 §3): metric definitions against references written here from the definitions
(docs/methods.md §10.5, SAEBench evals/core), both downstream conventions, splicing controls, one token mask per
convention, outlier tokens, bootstrap intervals, budget curves, ground-truth and stability metrics, the report card
and `saewb eval` on tiny run folders, and errors for bad input."""
import json

import numpy as np
import pytest
import torch

import analysis.eval_downstream as eval_downstream
from analysis.eval_core import eval_tokens, resample_counts
from analysis.eval_downstream import context_outliers, convention_masks
from analysis.eval_synthetic import greedy_matching, matched_cosines
from analysis.evals import (budget, budget_ks, check_model, core_metrics, downstream, eval_activations, eval_contexts,
                            fvu, loss_mask, planted_benchmark, planted_recovery, report_card, stability)
from analysis.splice import replacement, splice
from app.cli import main
from saes import build_sae, load_sae, save_sae
from training.synthetic import make_planted

HOOK = "blocks.1.hook_resid_post"
HOOK0 = "blocks.0.hook_resid_post"


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
    return build_sae("topk", d_in=64, d_sae=128, k=k, **({"hook_name": HOOK} | fields))


def n_hooks(model) -> int:
    points = {id(point): point for point in model.hook_dict.values()}  # some hook points have two names
    return sum(len(point.fwd_hooks) for point in points.values())


# ---- references, written from the definitions (no code under test) -------------------------------------------
def run_replaced(model, tokens, fn=None, positions=None, hook=HOOK):
    """Logits [b, ctx, vocab] with the hook's activation h replaced by fn(h) where `positions` [b, ctx] is True
    (everywhere when None); fn None = the clean model."""
    if fn is None:
        return model(tokens).float()

    def hook_fn(activation, hook):
        new = fn(activation)
        return new if positions is None else torch.where(positions[..., None], new, activation)

    with model.hooks(fwd_hooks=[(hook, hook_fn)]):
        return model(tokens).float()


def reference_scores(model, sae, tokens, special, outlier, mean, convention, hook=HOOK):
    """CE per pass, KL per pass, and the ratios, for one convention, from its definition:
    saebench: the SAE replaces h at every non-special token, the ablations at every position; CE over predictions
    whose input is not special, KL over every position whose input is not special. saebench_reconstruct_special:
    the SAE at every position too. special_masked: SAE and ablations only at non-special, non-outlier tokens; score
    where input and target are both non-special (KL on the same positions)."""
    if convention.startswith("saebench"):
        sae_at = None if convention == "saebench_reconstruct_special" else ~special
        ablate_at, ce_mask, kl_mask = None, ~special[:, :-1], ~special
    else:
        sae_at = ablate_at = ~special & ~outlier
        ce_mask = ~special[:, :-1] & ~special[:, 1:]
        kl_mask = torch.cat([ce_mask, torch.zeros(len(tokens), 1, dtype=torch.bool)], 1)
    fns = {"clean": None, "sae": lambda h: sae.decode(sae.encode(h)), "zero": lambda h: h * 0,
           "mean": lambda h: mean.expand_as(h).to(h.dtype)}
    logp = {name: run_replaced(model, tokens, fn, sae_at if name == "sae" else ablate_at, hook).log_softmax(-1)
            for name, fn in fns.items()}
    ce, kl = {}, {}
    for name, lp in logp.items():
        nll = -lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].double()  # float64 sums: the tiny model's
        ce[name] = nll[ce_mask].mean().item()  # CE gaps are ~1e-3, so the ratios amplify rounding
        div = (logp["clean"].exp() * (logp["clean"] - lp)).sum(-1).double()
        kl[name] = div[kl_mask].mean().item()
    out = {f"ce_{n}": v for n, v in ce.items()} | {f"kl_{n}": v for n, v in kl.items() if n != "clean"}
    out["ce_loss_recovered"] = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    out["ce_loss_recovered_mean_ablation"] = (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])
    out["kl_score"] = (kl["zero"] - kl["sae"]) / kl["zero"]
    out["kl_score_mean_ablation"] = (kl["mean"] - kl["sae"]) / kl["mean"]
    out["delta_lm_loss"] = ce["sae"] - ce["clean"]
    return out


def reference_core(x, x_hat, codes):
    """Core metrics of tokens x [n, d] from their definitions (§10.5, SAEBench evals/core)."""
    x, x_hat = x.double(), x_hat.double()
    err = (x - x_hat).pow(2).sum(-1)
    mu = x.mean(0)
    var = (x - mu).pow(2).sum(-1)
    second = x.pow(2).sum(-1).mean()
    fires = (codes != 0).double().mean(0)
    return {"fvu": (err.sum() / var.sum()).item(), "mse": err.mean().item(),
            "cosine": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item(),
            "explained_variance_saebench": (1 - err.mean() / (second - (second / x.shape[1]) ** 2)).item(),
            "explained_variance_saebench_legacy": (1 - err / var).mean().item(),
            "l0": (codes != 0).double().sum(-1).mean().item(), "l1": codes.abs().double().sum(-1).mean().item(),
            "dead_frac": (fires == 0).double().mean().item(), "dense_frac_1pct": (fires > 0.01).double().mean().item(),
            "shrinkage_gamma": (x_hat.pow(2).sum() / (x * x_hat).sum()).item(),
            "norm_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item()}


# Metrics that are ratios of plain per-token sums: their bootstrap replicates scatter around the point estimate.
# FVU (centred on each replicate's own mean) and dead/dense fractions (a replicate holds fewer distinct contexts)
# are biased under resampling, so their percentile interval may sit beside the point estimate.
MEAN_LIKE = ("mse", "cosine", "l0", "l1", "shrinkage_gamma", "norm_ratio")


def want_core_names():
    return ("mse", "cosine", "fvu", "explained_variance", "explained_variance_saebench",
            "explained_variance_saebench_legacy", "l0", "l1", "dead_frac", "dense_frac_1pct", "dense_frac_10pct",
            "shrinkage_gamma", "norm_ratio")


def reference_bootstrap(per_context: np.ndarray, stat, n_boot=4000, seed=123):
    """Percentile 95% interval of stat(summed rows) over contexts resampled with replacement (numpy's RNG, so it
    shares nothing with the code under test)."""
    rng = np.random.default_rng(seed)
    n = len(per_context)
    values = [stat(per_context[rng.integers(0, n, n)].sum(0)) for _ in range(n_boot)]
    return np.percentile(values, [2.5, 97.5])


# ---- core metrics ---------------------------------------------------------------------------------------------
def test_fvu_is_zero_for_perfect_reconstruction_and_one_for_the_mean():
    x = torch.randn(500, 16) * torch.linspace(0.1, 3, 16) + 2.0
    assert fvu(x, x) == pytest.approx(0.0, abs=1e-12)
    assert fvu(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0, abs=1e-9)


def toy_tokens(seed=0, n_ctx=12, per_ctx=20, d=64):
    """Tokens in contexts with a per-context offset (so contexts differ), a few of them outlier-norm."""
    g = torch.Generator().manual_seed(seed)
    offsets = 2 * torch.randn(n_ctx, d, generator=g)
    contexts = torch.arange(n_ctx).repeat_interleave(per_ctx)
    x = offsets[contexts] + torch.randn(len(contexts), d, generator=g)
    outlier = torch.zeros(len(x), dtype=torch.bool)
    outlier[torch.randperm(len(x), generator=g)[:9]] = True
    x[outlier] *= 30
    return x, contexts, outlier


def test_core_metrics_match_their_definitions_with_and_without_outliers():
    x, contexts, outlier = toy_tokens()
    sae = random_topk(k=8)
    chunks = [(x[:100], contexts[:100], outlier[:100]), (x[100:], contexts[100:], outlier[100:])]
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    every = core_metrics(sae, chunks, n_boot=0)["metrics"]
    regular = core_metrics(sae, chunks, outliers=False, n_boot=0)["metrics"]
    want_every = reference_core(x, x_hat, codes)
    want_regular = reference_core(x[~outlier], x_hat[~outlier], codes[~outlier])
    for got, want in ((every, want_every), (regular, want_regular)):
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
        assert got["explained_variance"] == pytest.approx(1 - want["fvu"], rel=1e-6)
    assert every["fvu_with_outliers"] == regular["fvu_with_outliers"] == pytest.approx(want_every["fvu"], rel=1e-6)
    assert every["fvu_without_outliers"] == pytest.approx(want_regular["fvu"], rel=1e-6)
    assert every["fvu_with_outliers"] != pytest.approx(every["fvu_without_outliers"], rel=1e-2)  # the sets differ
    assert every["tokens"] == len(x) and regular["tokens"] == int((~outlier).sum())
    assert every["outlier_tokens"] == 9
    # the three explained variances are different numbers on these data
    ev = [every[k] for k in ("explained_variance", "explained_variance_saebench", "explained_variance_saebench_legacy")]
    assert len({round(v, 3) for v in ev}) == 3


def test_eval_tokens_flag_outliers_and_number_contexts_across_shards(tiny_cache):
    shards = [tiny_cache.n_shards - 2, tiny_cache.n_shards - 1]
    xs, cs, os_ = zip(*eval_tokens(tiny_cache, HOOK, shards, chunk=300))
    x, contexts, outlier = torch.cat(xs), torch.cat(cs), torch.cat(os_)
    ctx = tiny_cache.context_length
    want_x, want_c, want_o, flags = [], [], [], []
    offset = 0
    for index in shards:  # brute force: every non-special token, outlier = norm > factor * median
        special = tiny_cache.read(index, "special").reshape(-1).bool()
        norms = tiny_cache.read(index, f"norms.{HOOK}")
        limit = tiny_cache.manifest["outlier_factor"] * tiny_cache.stats(HOOK)["median_norm"]
        rows = torch.arange(len(special))[~special]
        want_x.append(tiny_cache.read(index, f"acts.{HOOK}")[rows].float())
        want_c.append(offset + rows // ctx)
        want_o.append(norms[rows] > limit)
        flags.append(((norms > limit) & ~special).reshape(-1, ctx))
        offset += len(special) // ctx
    assert torch.equal(x, torch.cat(want_x)) and torch.equal(contexts, torch.cat(want_c))
    assert torch.equal(outlier, torch.cat(want_o))
    assert int(contexts.max()) + 1 == offset
    assert torch.equal(context_outliers(tiny_cache, HOOK, shards, offset), torch.cat(flags))  # downstream's flags


def test_bootstrap_intervals_resample_contexts():
    """The interval of a pooled ratio matches an independent numpy bootstrap over contexts within Monte Carlo
    error (10% of the width), is reproducible, holds the point estimate, and is far wider than a bootstrap over
    tokens would be (the toy's contexts are strongly correlated inside)."""
    x, contexts, outlier = toy_tokens(seed=1, n_ctx=30)
    sae = random_topk(k=4)
    out = core_metrics(sae, [(x, contexts, outlier)], outliers=False)
    again = core_metrics(sae, [(x, contexts, outlier)], outliers=False)
    assert out["intervals"] == again["intervals"]
    assert set(out["intervals"]) >= set(want_core_names()) | {"fvu_with_outliers", "fvu_without_outliers"}
    for name in MEAN_LIKE:  # ratios of plain sums: the point estimate lies inside (see eval_core on the others)
        low, high = out["intervals"][name]
        assert low <= out["metrics"][name] <= high, name
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    keep = ~outlier
    per_ctx = np.zeros((30, 2))  # per context: [sum ||x - x_hat||^2, tokens]
    np.add.at(per_ctx, contexts[keep].numpy(), np.stack([(x - x_hat)[keep].pow(2).sum(-1).double().numpy(),
                                                          np.ones(int(keep.sum()))], 1))
    low, high = reference_bootstrap(per_ctx, lambda s: s[0] / s[1])
    got = out["intervals"]["mse"]
    width = high - low
    assert got[0] == pytest.approx(low, abs=0.1 * width) and got[1] == pytest.approx(high, abs=0.1 * width)
    # a token-level bootstrap of the same statistic is much narrower: the unit matters
    per_token = np.stack([(x - x_hat)[keep].pow(2).sum(-1).double().numpy(), np.ones(int(keep.sum()))], 1)
    token_low, token_high = reference_bootstrap(per_token, lambda s: s[0] / s[1], n_boot=1000)
    assert (got[1] - got[0]) > 1.5 * (token_high - token_low)


def test_resample_counts_are_uniform_draws_with_replacement():
    counts = resample_counts(7, n_boot=20000, seed=3)
    assert counts.shape == (20000, 7) and torch.all(counts.sum(1) == 7)
    # each count is Binomial(7, 1/7): mean 1, variance 6/7; 20000 draws pin both to ~1%
    assert counts.mean().item() == pytest.approx(1.0, abs=0.02)
    assert counts.var().item() == pytest.approx(6 / 7, abs=0.03)
    assert torch.equal(counts, resample_counts(7, n_boot=20000, seed=3))


def test_l0_of_topk_equals_k_and_signed_codes_count_nonzero(tiny_cache, held_out):
    shards = held_out[0]
    result = core_metrics(random_topk(k=8), list(eval_activations(tiny_cache, HOOK, shards)), ks=[2, 4, 16],
                          n_boot=0)
    assert result["metrics"]["l0"] == pytest.approx(8.0)
    assert [result["budget"][k]["l0"] for k in (2, 4, 16)] == pytest.approx([2.0, 4.0, 16.0])
    assert result["l0_counts"][8] == result["metrics"]["tokens"]
    signed = build_sae("abstopk", d_in=64, d_sae=128, k=8, hook_name=HOOK, selection="per_token")
    x = next(iter(eval_activations(tiny_cache, HOOK, shards)))
    codes = signed.encode(x)
    assert bool((codes < 0).any())
    out = core_metrics(signed, [x], n_boot=0)
    assert out["metrics"]["l0"] == pytest.approx(8.0)
    assert out["metrics"]["l1"] == pytest.approx(codes.abs().sum(-1).mean().item(), rel=1e-5)
    assert torch.allclose(out["density"], (codes != 0).float().mean(0))


def test_hierarchical_budget_curve_equals_topk_with_the_same_weights(tiny_cache, held_out, tmp_path):
    shards = held_out[0]
    save_sae(build_sae("hierarchical_topk", d_in=64, d_sae=128, k_max=16, hook_name=HOOK, seed=3), tmp_path)
    hier = load_sae(tmp_path)  # from a checkpoint folder
    assert budget_ks(hier) == [1, 2, 4, 8, 16] and budget_ks(random_topk(k=8)) == [1, 2, 4, 8, 16]
    x = next(iter(eval_activations(tiny_cache, HOOK, shards)))
    curve = core_metrics(hier, [x], ks=[1, 4, 16], n_boot=0)["budget"]
    for k in (1, 4, 16):
        topk = random_topk(k=k)
        topk.load_state_dict(hier.state_dict())
        with budget(hier, k) as view:
            assert torch.equal(view.decode(view.encode(x)), topk.decode(topk.encode(x)))
        assert curve[k]["fvu"] == pytest.approx(core_metrics(topk, [x], n_boot=0)["metrics"]["fvu"], rel=1e-12)
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


# ---- splicing and downstream metrics --------------------------------------------------------------------------
def test_splice_acts_only_at_its_positions(tiny_model, held_out):
    tokens = held_out[1][:3]
    positions = torch.zeros(tokens.shape, dtype=torch.bool)
    positions[:, 10:20] = True
    positions[1, 40] = True
    sae = random_topk()
    mean = torch.randn(64, generator=torch.Generator().manual_seed(4))
    cases = [("zero", {}, lambda h: h * 0), ("mean", {"mean": mean}, lambda h: mean.expand_as(h)),
             ("sae", {"sae": sae}, lambda h: sae.decode(sae.encode(h)))]
    with torch.no_grad():
        for mode, kwargs, fn in cases:
            want = run_replaced(tiny_model, tokens, fn, positions)
            with splice(tiny_model, HOOK, mode, positions=positions, **kwargs):
                got = tiny_model(tokens).float()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            everywhere = run_replaced(tiny_model, tokens, fn, None)
            assert not torch.allclose(got, everywhere, atol=1e-3), mode  # the mask matters here
            assert torch.allclose(got[:, :10], tiny_model(tokens)[:, :10].float(), atol=1e-5)  # causal: before 10


ALL = ("saebench", "saebench_reconstruct_special", "special_masked")


@pytest.mark.parametrize("convention", ALL)
def test_downstream_metrics_match_their_definitions(tiny_model, tiny_cache, held_out, convention):
    """Against references from the definitions, with a non-zero mean (so mean- and zero-ablation differ) and
    outlier flags at some positions (where only the special-masked convention leaves h alone); BOS is special in
    every context, so the three conventions act at different positions. The hook is block 0's output, so what
    is done at BOS reaches the scored positions through block 1's attention."""
    shards, tokens, special = held_out
    tokens, special = tokens[:6], special[:6]
    outlier = torch.zeros_like(special)
    outlier[:, 7] = outlier[2, 30:33] = True
    outlier &= ~special
    sae = random_topk(hook_name=HOOK0)
    mean = torch.cat(list(eval_activations(tiny_cache, HOOK0, shards))).mean(0)
    others = [c for c in ALL if c != convention]
    got = downstream(tiny_model, sae, HOOK0, tokens, special, mean=mean, outlier=outlier, batch_size=6,
                     conventions=(convention, *others), n_boot=0)
    with torch.no_grad():
        want = reference_scores(tiny_model, sae, tokens, special, outlier, mean, convention, HOOK0)
        # where each convention acts matters on these data: the other conventions' references differ
        for other in others:
            alt = reference_scores(tiny_model, sae, tokens, special, outlier, mean, other, HOOK0)
            assert any(abs(alt[k] - want[k]) > 1e-3 * abs(want[k]) for k in ("kl_sae", "kl_zero", "kl_mean")), other
    assert got["convention"] == convention
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert got["conventions"][convention][name] == got[name]
    # the references are far enough apart that a swapped ablation or a zero "mean" cannot pass
    assert abs(want["kl_mean"] - want["kl_zero"]) > 0.05 * want["kl_zero"]
    assert abs(want["ce_loss_recovered"] - want["ce_loss_recovered_mean_ablation"]) > 0.02
    assert abs(want["kl_score"] - want["kl_score_mean_ablation"]) > 0.02
    assert got["tokens"] == int(convention_masks(convention, special, outlier)[2].sum())


def test_the_conventions_differ_where_they_should(tiny_model, held_out):
    _, tokens, special = held_out
    tokens, special = tokens[:4], special[:4].clone()
    special[:2, 30] = True  # an "EOS" inside two contexts: SAEBench scores its prediction, special_masked does not
    got = downstream(tiny_model, random_topk(), HOOK, tokens, special, n_boot=0)
    a, b = got["conventions"]["saebench"], got["conventions"]["special_masked"]
    assert got["convention"] == "saebench" and got["ce_loss_recovered"] == a["ce_loss_recovered"]
    assert a["scored_positions"] == int((~special[:, :-1]).sum()) == b["scored_positions"] + 2


def test_ce_recovered_is_one_with_the_error_term_and_zero_with_zero_ablation(tiny_model, held_out):
    _, tokens, special = held_out
    sae = random_topk()
    identity = downstream(tiny_model, sae, HOOK, tokens, special, sae_mode="sae_with_error", n_boot=0)
    zeroed = downstream(tiny_model, sae, HOOK, tokens, special, sae_mode="zero", n_boot=0)
    for convention in ALL:
        one, zero = identity["conventions"][convention], zeroed["conventions"][convention]
        assert one["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert one["delta_lm_loss"] == pytest.approx(0.0, abs=1e-4) and one["kl_sae"] < 1e-6
        assert one["ce_zero"] != pytest.approx(one["ce_clean"], abs=1e-3)
        assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
        assert zero["kl_score"] == pytest.approx(0.0, abs=1e-6)


def test_every_pass_scores_the_same_token_mask(tiny_model, held_out, monkeypatch):
    _, tokens, special = held_out
    special = special.clone()
    special[:, 5] = special[:, 20] = True  # extra "special" tokens: masked as inputs (and as targets)
    seen = []
    real = eval_downstream.pass_scores

    def spy(logits, targets, ce_mask, kl_mask, clean_logp):
        seen.append((ce_mask.clone(), kl_mask.clone()))
        return real(logits, targets, ce_mask, kl_mask, clean_logp)

    monkeypatch.setattr(eval_downstream, "pass_scores", spy)
    mean = torch.randn(64)
    result = downstream(tiny_model, random_topk(), HOOK, tokens, special, mean=mean, ks=[2, 4, 8], batch_size=16,
                        n_boot=0)
    # one batch: the clean pass scored under each convention; then each distinct forward (sae at non-special
    # tokens, zero and mean everywhere, each shared by both SAEBench conventions; sae everywhere; sae, zero, mean at
    # training tokens) scored under each convention using it; then budgets 2 and 4 under the headline convention
    # (k=8 is the SAE pass)
    saebench = (~special[:, :-1], ~special)
    masked_ce = loss_mask(special)
    masked = (masked_ce, torch.cat([masked_ce, torch.zeros(len(special), 1, dtype=torch.bool)], 1))
    S, M = saebench, masked
    expected = [S, S, M] + [S] + [S, S] + [S, S] + [S] + [M, M, M] + [S, S]
    assert len(seen) == len(expected) == 14
    for (ce_mask, kl_mask), (want_ce, want_kl) in zip(seen, expected):
        assert torch.equal(ce_mask, want_ce) and torch.equal(kl_mask, want_kl)
    assert not masked_ce[:, 4].any() and not masked_ce[:, 5].any() and saebench[0][:, 4].all()
    assert result["budget"][8]["ce_sae"] == pytest.approx(result["ce_sae"], rel=1e-6)


def test_downstream_intervals_resample_contexts(tiny_model, held_out):
    _, tokens, special = held_out
    sae = random_topk()
    result = downstream(tiny_model, sae, HOOK, tokens, special, n_boot=2000)
    ci = result["intervals"]["saebench"]
    for name in ("ce_loss_recovered", "kl_score", "delta_lm_loss", "ce_sae", "kl_sae"):
        assert ci[name][0] <= result[name] <= ci[name][1], name
    # delta LM loss = a ratio of per-context sums: compare with an independent bootstrap over the 16 contexts
    _, _, ce_mask, _ = convention_masks("saebench", special)
    with torch.no_grad():
        nll = {name: -run_replaced(tiny_model, tokens, fn).log_softmax(-1)[:, :-1]
               .gather(-1, tokens[:, 1:, None])[..., 0].double()
               for name, fn in (("clean", None), ("sae", lambda h: sae.decode(sae.encode(h))))}
    per_ctx = np.stack([(nll["sae"] * ce_mask).sum(1).numpy(), (nll["clean"] * ce_mask).sum(1).numpy(),
                        ce_mask.sum(1).double().numpy()], 1)
    low, high = reference_bootstrap(per_ctx, lambda s: (s[0] - s[1]) / s[2])
    width = high - low
    got = ci["delta_lm_loss"]
    assert got[0] == pytest.approx(low, abs=0.1 * width) and got[1] == pytest.approx(high, abs=0.1 * width)


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


# ---- ground truth and stability -------------------------------------------------------------------------------
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


# ---- the report card and the command --------------------------------------------------------------------------
def test_cli_eval_end_to_end(runs, tiny_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["eval", str(runs / "sweep"), str(runs / "seed1"), "--out", str(out), "--max-contexts", "16",
                 "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    assert "CE loss recovered" in text and "dLM loss" in text and "stability" in text and "saebench" in text
    sweep = sorted(p.name for p in (runs / "sweep").iterdir() if (p / "eval" / "metrics.json").is_file())
    assert sweep == ["hierarchical_topk-k8-blocks_1_hook_resid_post", "topk-k8-blocks_1_hook_resid_post"]
    topk_dir = runs / "sweep" / sweep[1]
    card = json.loads((topk_dir / "eval" / "metrics.json").read_text())
    assert card["core"]["l0"] == pytest.approx(8.0) and 0 < card["core"]["fvu"] < 1
    assert card["eval"]["split"] == "held-out shards" and card["eval"]["contexts"] == 16
    assert card["eval"]["convention"] == "saebench" and card["downstream"]["convention"] == "saebench"
    assert card["eval"]["bootstrap"] == {"unit": "context", "replicates": 200, "seed": 0, "level": 0.95,
                                         "interval": "percentile"}
    summary = json.loads((topk_dir / "summary.json").read_text())
    # training's held-out FVU is over its training tokens: the same number as the card's FVU without outliers
    assert card["core"]["fvu_without_outliers"] == pytest.approx(summary["fvu"], rel=1e-5)
    assert card["core"]["fvu"] == card["core"]["fvu_with_outliers"]  # saebench: outlier tokens count
    d = card["downstream"]
    assert d["ce_zero"] != d["ce_clean"] and d["delta_lm_loss"] == pytest.approx(d["ce_sae"] - d["ce_clean"])
    assert set(card["downstream_conventions"]) == set(ALL)
    for name in MEAN_LIKE:
        low, high = card["intervals"]["core"][name]
        assert low <= card["core"][name] <= high, name
    for name in ("ce_clean", "ce_sae", "kl_sae", "delta_lm_loss", "ce_loss_recovered", "kl_score"):
        low, high = card["intervals"]["downstream"][name]
        assert low <= d[name] <= high, name
    for name in ("fvu_with_outliers", "fvu_without_outliers", "explained_variance_saebench", "l0", "dead_frac"):
        assert name in card["intervals"]["core"]
    for name in ("ce_loss_recovered", "kl_score", "delta_lm_loss"):
        assert name in card["intervals"]["downstream_conventions"]["special_masked"]
    assert [row["k"] for row in card["budget"]] == [1, 2, 4, 8, 16]
    row8 = card["budget"][3]
    assert row8["fvu"] == pytest.approx(card["core"]["fvu"]) and row8["ce_sae"] == pytest.approx(d["ce_sae"])
    assert row8["ci"]["delta_lm_loss"] == card["intervals"]["downstream"]["delta_lm_loss"]
    assert card["budget"][-1]["above_trained_k"] and not row8["above_trained_k"]
    hier = json.loads((runs / "sweep" / sweep[0] / "eval" / "metrics.json").read_text())
    assert [row["k"] for row in hier["budget"]] == [1, 2, 4, 8]
    for name in ("density_histogram", "l0_histogram", "budget_curve"):
        figure = json.loads((topk_dir / "eval" / "figures" / f"{name}.json").read_text())
        assert figure["data"], name
    curve = json.loads((topk_dir / "eval" / "figures" / "budget_curve.json").read_text())
    assert all(t["error_y"]["array"] and t["error_x"]["array"] for t in curve["data"])
    for name in ("table.csv", "table.md", "cards.json", "stability.csv", "report.html"):
        assert (out / name).is_file(), name
    lines = (out / "table.csv").read_text().splitlines()
    header = lines[0].split(",")
    for name in ("FVU (with outliers)", "FVU (without outliers)", "EV (SAEBench)", "CE recovered (SAEBench)",
                 "CE recovered (special-masked)", "KL score (SAEBench)", "delta LM loss (SAEBench)"):
        assert name in header and f"{name} low" in header and f"{name} high" in header, name
    assert len(lines) == 4
    table = (out / "table.md").read_text()
    assert "| run |" in table and "Stability across seeds" in table and " [" in table and "bootstrap" in table
    stab = (out / "stability.csv").read_text().splitlines()
    assert len(stab) == 2 and "seed1" in stab[1] and "topk-k8" in stab[1]
    labels = ["seed1", f"sweep/{sweep[0]}", f"sweep/{sweep[1]}"]
    fig = json.loads((out / "figures" / "fvu_vs_l0.json").read_text())
    assert sorted(t["name"] for t in fig["data"]) == sorted(labels + ["Pareto front"])
    assert all(t["error_y"]["array"] for t in fig["data"] if t["name"] != "Pareto front")
    fig = json.loads((out / "figures" / "budget_curves.json").read_text())
    assert sorted({t["name"] for t in fig["data"]}) == sorted(labels) and len(fig["data"]) == 6
    assert json.loads((out / "figures" / "dead_latents.json").read_text())["data"][0]["error_y"]
    for name in ("fvu_vs_l0", "delta_lm_loss_vs_l0", "dead_latents", "budget_curves"):
        assert (out / "figures" / f"{name}.json").is_file() and (out / "figures" / f"{name}.html").is_file()


def test_bad_inputs_name_the_fix(tiny_model, tiny_cache, runs, held_out, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 1
    assert "has no SAE weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(runs / "seed1"), "--convention", "nope"])
    assert "special_masked" in capsys.readouterr().err  # tyro lists the choices
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
    with pytest.raises(ValueError, match="convention"):
        downstream(tiny_model, random_topk(), HOOK, tokens, special, conventions=("sae_bench",))
    with pytest.raises(ValueError, match="max-contexts"):
        report_card(run, model=tiny_model, max_contexts=0)
    with pytest.raises(ValueError, match="scored positions"):
        report_card(run, model=tiny_model, max_contexts=1, write=False)


def test_report_card_adds_the_supervised_dictionary_scores_on_request(runs, tiny_model):
    from analysis.supervised_dict import supervised_scores

    run = runs / "seed1"
    card = report_card(run, model=tiny_model, max_contexts=2, budget_curve=False, write=False, n_boot=0,
                       supervised="ioi")
    direct = supervised_scores(run, task="ioi", model=tiny_model)
    assert card["supervised_dictionary"]["hook"] == HOOK
    assert card["supervised_dictionary"]["sae"]["sufficiency"] == pytest.approx(direct["sae"]["sufficiency"])
    assert "supervised_dictionary" not in report_card(run, model=tiny_model, max_contexts=2, budget_curve=False,
                                                      write=False, n_boot=0)
    from analysis.eval_compare import card_figures

    sup = card["supervised_dictionary"]
    fig = card_figures(card)["supervised_dictionary"]  # shown with the card's other figures on the Runs page
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert bars == {"supervised dictionary": [sup["supervised"]["sufficiency"], sup["supervised"]["necessity"]],
                    "SAE": [sup["sae"]["sufficiency"], sup["sae"]["necessity"]]}
    line = next(t for t in fig.data if t.type == "scatter")
    assert list(line.x) == [1, 2, 4, 8] and list(line.y) == [sup["sae"]["control"][str(k)] for k in (1, 2, 4, 8)]
    assert sup["supervised"]["control"] in [s.y0 for s in fig.layout.shapes]
    from analysis.evals import format_report

    printed = format_report(card).splitlines()[-1]  # what `saewb eval --supervised ioi` prints
    assert printed.startswith("  supervised ioi dictionary") and f"vs SAE {sup['sae']['sufficiency']:.2f}" in printed
    # the quasi-orthogonality diagnostics are in every card, on the same held-out tokens as afa_card, with a figure
    from analysis.afa import afa_card

    alone = afa_card(run, write=False)
    assert card["afa"]["tokens"] == alone["tokens"] > 0
    assert card["afa"]["epsilon_lbo"]["median"] == pytest.approx(alone["epsilon_lbo"]["median"])
    assert "zf" in card_figures(card)
