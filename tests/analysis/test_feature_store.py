"""The whole feature store (analysis/features.py writes it, analysis/store.py reads it) against brute force on the
4-shard tiny cache (issue 13 §4): for every latent its density, firing count, mean activation and histogram, its
top (and, signed, bottom) contexts with every window position's token and activation, global rows offset across
shards, the random firing samples and their quantile groups, and a statistical check that the samples are uniform
over the latent's firing positions. Neighbours come from the decoder alone; the logit lens is tested elsewhere."""
import json
import math

import pytest
import torch

from analysis.features import FeaturesConfig, build_features, hist_edges
from analysis.store import FeatureStore
from saes import build_sae, save_sae

HOOK = "blocks.1.hook_resid_post"
TOP_N, SAMPLES, LEFT, RIGHT, BINS = 8, 24, 6, 3, 48
# Kolmogorov-Smirnov: sqrt(n) * D exceeds 1.95 with probability about 0.001 for a uniform sample (asymptotic
# Kolmogorov distribution); the seeds are fixed, so the check is deterministic.
KS_LIMIT = 1.95


def store_for(sae, tiny_model, tiny_cache, folder):
    """A run folder for `sae` on the tiny cache, and its feature store."""
    folder.mkdir()
    save_sae(sae, folder)
    (folder / "summary.json").write_text(json.dumps({"cache": str(tiny_cache.path), "hook": HOOK}))
    (folder / "config.json").write_text(json.dumps({"cache": {"model": "tiny"}}))
    cfg = FeaturesConfig(run_dir=folder, top_n=TOP_N, samples=SAMPLES, left=LEFT, right=RIGHT, bins=BINS,
                         batch_size=1000, progress=False)  # chunks straddle context and shard boundaries
    return FeatureStore(build_features(cfg, model=tiny_model, sae=sae))


@pytest.fixture(scope="module")
def brute(tiny_cache):
    """Every cached token of every shard, concatenated in shard order: activations [N, d], token ids [N], the
    keep mask [N] (not special, not outlier) and each row's shard [N]."""
    shards = range(tiny_cache.n_shards)
    acts = torch.cat([tiny_cache.read(i, f"acts.{HOOK}").float() for i in shards])
    tokens = torch.cat([tiny_cache.tokens(i).reshape(-1) for i in shards])
    keep = torch.cat([tiny_cache.keep_mask(i, HOOK) for i in shards])
    shard = torch.cat([torch.full((tiny_cache.tokens(i).numel(),), i) for i in shards])
    return acts, tokens, keep, shard


def codes_of(sae, brute):
    acts, _, keep, _ = brute
    with torch.no_grad():
        return sae.encode(acts).float() * keep[:, None]  # [N, d_sae]; left-out tokens never fire


@pytest.fixture(scope="module")
def topk_store(tiny_model, tiny_cache, brute, tmp_path_factory):
    sae = build_sae("topk", d_in=64, d_sae=256, k=8, hook_name=HOOK, seed=11)
    store = store_for(sae, tiny_model, tiny_cache, tmp_path_factory.mktemp("store") / "topk")
    return sae, store, codes_of(sae, brute)


def expected_window(row: int, latent: int, codes, tokens, ctx: int):
    """Token ids and the latent's activations at offsets -LEFT..RIGHT of `row`, -1 / 0 outside its context."""
    pos, start = row % ctx, row - row % ctx
    ids, acts = [], []
    for offset in range(-LEFT, RIGHT + 1):
        inside = 0 <= pos + offset < ctx
        ids.append(int(tokens[start + pos + offset]) if inside else -1)
        acts.append(float(codes[row + offset, latent]) if inside else 0.0)
    return ids, acts


def check_examples(kind, values, rows, win_tokens, win_acts, want_values, latent, codes, tokens, ctx):
    """One latent's stored examples ([n] values, rows; [n, W] windows) against the expected values. Equal
    activations occur (the same token after BOS gives the same activation), so which of several tied rows is kept
    is free: each stored row must be distinct, carry its stored value, and have its own window."""
    n = len(want_values)
    assert torch.isnan(values[n:]).all() and (rows[n:] == -1).all(), kind  # unused slots stay empty
    torch.testing.assert_close(values[:n], want_values, rtol=1e-5, atol=1e-6)
    kept = rows[:n].tolist()
    assert len(set(kept)) == n and min(kept, default=0) >= 0, kind
    torch.testing.assert_close(codes[kept, latent], values[:n], rtol=1e-5, atol=1e-6)
    for j, row in enumerate(kept):
        ids, acts = expected_window(row, latent, codes, tokens, ctx)
        assert win_tokens[j].tolist() == ids, (kind, latent, j)
        torch.testing.assert_close(win_acts[j], torch.tensor(acts), rtol=1e-5, atol=1e-6)


def test_every_latent_matches_brute_force(topk_store, brute, tiny_cache):
    sae, store, codes = topk_store
    _, tokens, keep, shard = brute
    ctx = tiny_cache.context_length
    d_sae = sae.cfg.d_sae
    columns = {name: store.column(name) for name in store.index["tensors"]}
    fired = (codes != 0).sum(0)
    assert store.index["n_tokens"] == int(keep.sum()) and store.index["shards"] == tiny_cache.n_shards == 4
    assert columns["fired"].tolist() == fired.tolist()
    torch.testing.assert_close(columns["density"], fired.float() / keep.sum(), rtol=1e-6, atol=0)
    mean_act = codes.sum(0) / fired.clamp(min=1)
    torch.testing.assert_close(columns["mean_act"], mean_act, rtol=1e-4, atol=1e-6)
    edges = hist_edges(BINS)
    top_shards = set()
    for latent in range(d_sae):
        column = codes[:, latent]
        firing = column.nonzero()[:, 0]
        # histogram of |activation| on the shared log-spaced bins (values outside land in the end bins)
        bins = (torch.bucketize(column[firing].abs(), edges, right=True) - 1).clamp(0, BINS - 1)
        want_hist = torch.bincount(bins, minlength=BINS)
        got_hist = columns["hist"][latent]
        assert got_hist.sum() == len(firing)
        assert (got_hist - want_hist).abs().sum() <= 2, latent  # a value on a bin edge may round either way
        # top contexts: the TOP_N largest positive activations, every window position's token and activation
        n = min(TOP_N, int((column > 0).sum()))
        want = column.topk(n)
        check_examples("top", columns["top_values"][latent], columns["top_rows"][latent],
                       columns["top_tokens"][latent], columns["top_acts"][latent], want.values, latent, codes,
                       tokens, ctx)
        top_shards |= set(shard[columns["top_rows"][latent][:n]].tolist())
        # random samples: distinct firing rows, sorted by activation, with their windows
        m = min(SAMPLES, len(firing))
        rows = columns["sample_rows"][latent][:m]
        assert len(set(rows.tolist())) == m and bool((column[rows] != 0).all())
        values = column[rows]
        assert bool((values[1:] >= values[:-1]).all())
        check_examples("sample", columns["sample_values"][latent], columns["sample_rows"][latent],
                       columns["sample_tokens"][latent], columns["sample_acts"][latent], values, latent, codes,
                       tokens, ctx)
    assert top_shards == {0, 1, 2, 3}  # the top examples come from every shard: rows are offset across them
    # decoder neighbours: the 10 most similar decoder directions, self excluded
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = W @ W.T
    cos.fill_diagonal_(-math.inf)
    want = cos.topk(10, dim=1)
    torch.testing.assert_close(columns["neighbour_cos"], want.values, rtol=1e-5, atol=1e-6)
    assert columns["neighbour_ids"].long().tolist() == want.indices.tolist()


def test_the_read_api_returns_the_same_examples(topk_store, brute, tiny_cache):
    """store.latent(i): the examples as the app shows them (tokens outside the context dropped, the centre
    index pointing at the example's own token), for every latent."""
    sae, store, codes = topk_store
    _, tokens, _, _ = brute
    ctx = tiny_cache.context_length
    for latent in range(sae.cfg.d_sae):
        record = store.latent(latent)
        column = codes[:, latent]
        assert record["fired"] == int((column != 0).sum())
        for kind, examples in (("top", record["top"]), ("sample", record["samples"])):
            for example in examples:
                row = example["row"]
                ids, acts = expected_window(row, latent, codes, tokens, ctx)
                inside = [j for j, t in enumerate(ids) if t >= 0]
                assert example["token_ids"] == [ids[j] for j in inside], (kind, latent)
                assert example["acts"] == pytest.approx([acts[j] for j in inside], rel=1e-5, abs=1e-6)
                assert example["tokens"] == [store.token_str(ids[j]) for j in inside]
                assert example["centre"] == inside.index(LEFT)
                assert example["token_ids"][example["centre"]] == int(tokens[row])
                assert example["value"] == pytest.approx(float(column[row]), rel=1e-5)
        assert [e["value"] for e in record["top"]] == pytest.approx(
            column.topk(min(TOP_N, int((column > 0).sum()))).values.tolist(), rel=1e-5)


def test_quantile_samples_split_the_sorted_sample(topk_store):
    sae, store, _ = topk_store
    for latent in range(sae.cfg.d_sae):
        record = store.latent(latent)
        samples = record["samples"]
        values = [s["value"] for s in samples]
        groups = store.quantile_samples(record, groups=4, per_group=2)
        if len(samples) < 4:
            continue
        assert [name for name, _ in groups] == ["0-25%", "25-50%", "50-75%", "75-100%"]
        for g, (_, picked) in enumerate(groups):
            # group g holds samples whose rank in the sorted sample lies in [g/4, (g+1)/4) of it
            low, high = g * len(values) / 4, (g + 1) * len(values) / 4
            assert 1 <= len(picked) <= 2
            for example in picked:
                rank = next(i for i, s in enumerate(samples) if s["row"] == example["row"])
                assert low - 1 < rank < high, (latent, g)
        firsts = [picked[0]["value"] for _, picked in groups]
        assert firsts == sorted(firsts)


def ks_uniform(u: torch.Tensor) -> float:
    """sqrt(n) * Kolmogorov-Smirnov distance of values in [0, 1) from the uniform distribution."""
    u = u.double().sort().values
    n = len(u)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return math.sqrt(n) * max((grid - u).max().item(), (u - (grid - 1 / n)).max().item())


def test_random_samples_are_uniform_over_firing_positions(topk_store, brute):
    """Pooled over latents, the rank of each sampled row among the latent's firing rows (by position and by
    activation) is uniform, and the samples fall in each shard in proportion to the firing there."""
    sae, store, codes = topk_store
    _, _, _, shard = brute
    rows = store.column("sample_rows")
    by_position, by_value = [], []
    in_shard, expected = torch.zeros(4), torch.zeros(4)
    for latent in range(sae.cfg.d_sae):
        firing = codes[:, latent].nonzero()[:, 0]  # sorted by row
        if len(firing) < 4 * SAMPLES:  # well above the sample size, so without-replacement effects are small
            continue
        picked = rows[latent]
        picked = picked[picked >= 0]
        position_rank = torch.searchsorted(firing, picked)
        order = codes[firing, latent].argsort()
        value_rank = torch.empty_like(order)
        value_rank[order] = torch.arange(len(order))
        value_rank = value_rank[position_rank]
        jitter = torch.rand(len(picked), generator=torch.Generator().manual_seed(latent))  # continuous ranks
        by_position.append((position_rank + jitter) / len(firing))
        by_value.append((value_rank + jitter) / len(firing))
        in_shard += torch.bincount(shard[picked], minlength=4)
        expected += len(picked) * torch.bincount(shard[firing], minlength=4) / len(firing)
    by_position, by_value = torch.cat(by_position), torch.cat(by_value)
    assert len(by_position) > 2000
    assert ks_uniform(by_position) < KS_LIMIT and ks_uniform(by_value) < KS_LIMIT
    chi2 = ((in_shard - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom: exceeded with probability 0.001
    # the check has power: the top activations or the first shard's firings would fail it at once
    assert ks_uniform(torch.linspace(0.9, 1, len(by_value))) > KS_LIMIT


def test_signed_sae_bottom_contexts_match_brute_force(tiny_model, tiny_cache, brute, tmp_path):
    sae = build_sae("abstopk", d_in=64, d_sae=32, k=4, hook_name=HOOK, seed=5, selection="per_token")
    store = store_for(sae, tiny_model, tiny_cache, tmp_path / "signed")
    codes = codes_of(sae, brute)
    _, tokens, _, _ = brute
    ctx = tiny_cache.context_length
    columns = {name: store.column(name) for name in store.index["tensors"]}
    assert store.index["signed"]
    for latent in range(sae.cfg.d_sae):
        column = codes[:, latent]
        n = min(TOP_N, int((column < 0).sum()))
        want = (-column).topk(n)
        check_examples("bottom", columns["bottom_values"][latent], columns["bottom_rows"][latent],
                       columns["bottom_tokens"][latent], columns["bottom_acts"][latent], -want.values, latent,
                       codes, tokens, ctx)
        n = min(TOP_N, int((column > 0).sum()))
        want = column.topk(n)
        check_examples("top", columns["top_values"][latent], columns["top_rows"][latent],
                       columns["top_tokens"][latent], columns["top_acts"][latent], want.values, latent, codes,
                       tokens, ctx)
        assert int(columns["hist"][latent].sum()) == int((column > 0).sum())
        assert int(columns["hist_neg"][latent].sum()) == int((column < 0).sum())


def test_labels_are_saved_with_the_store(topk_store):
    """labels.json is written by build_features (one label per latent, named in the index) and equals the LLM-free
    label of each latent's stored top contexts and logit lens."""
    from analysis.labels import LABELS, token_label

    sae, store, codes = topk_store
    saved = json.loads((store.folder / LABELS).read_text())
    assert store.index["labels"] == LABELS and len(saved) == sae.cfg.d_sae and store.labels == saved
    for latent in range(0, sae.cfg.d_sae, 17):
        record = store.latent(latent)
        centres = [e["tokens"][e["centre"]] for e in record["top"]]
        assert saved[latent] == token_label(centres, [t for t, _ in record["logit_lens"]["top"]])
        assert (saved[latent] == "dead" or saved[latent].startswith("dead →")) == (not record["top"])
    assert any("‹" in label for label in saved)
