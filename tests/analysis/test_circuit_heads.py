"""Head-level discovery's edge ranking (docs/methods.md §10.1) against a re-implementation, written here in numpy, of
the reference code's selection (O'Neill & Bui, SAECIRC `edge.py` + `main.py`): co-occurrence tensors, pairs seen
only on positives, all ordered pairs sorted, the heads of the first n^2 // 2 entries counted."""
import numpy as np
import torch

from analysis.circuit_heads import edge_scores, heads_from_edges, roc_auc


def reference_edge_heads(codes: np.ndarray, positive: np.ndarray, normalise: bool, tie_orders: int = 1000
                         ) -> np.ndarray:
    """The reference's head counts, averaged over `tie_orders` random orders of tied pairs (its own numpy sort
    leaves that order unspecified). [n_heads]."""
    n_heads, n_feat = codes.shape[1], int(codes.max()) + 1

    def co_occurrence(rows):
        counts = np.zeros((n_heads, n_heads, n_feat, n_feat))
        for row in rows:
            for h1 in range(n_heads):
                for h2 in range(n_heads):
                    if h1 != h2:
                        counts[h1, h2, row[h1], row[h2]] += 1
        return counts

    seen_pos, seen_neg = co_occurrence(codes[positive]) > 0, co_occurrence(codes[~positive]) > 0
    unique = (seen_pos & ~seen_neg).sum((2, 3)).astype(float)
    if normalise:
        total = seen_pos.sum((2, 3)) + seen_neg.sum((2, 3))
        unique = np.where(total > 0, unique / np.maximum(total, 1), 0.0)
    rng = np.random.default_rng(0)
    counts = np.zeros(n_heads)
    for _ in range(tie_orders):
        order = np.lexsort((rng.random(n_heads ** 2), -unique.flatten()))  # by score, descending; ties at random
        first, second = np.unravel_index(order, unique.shape)
        components = [int(h) for pair in zip(first, second) for h in pair]
        for h in components[: n_heads ** 2 // 2]:
            counts[h] += 1
    return counts / tie_orders


def mann_whitney_auc(scores, truth) -> float:
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p in scores[truth] for n in scores[~truth]]
    return sum(wins) / len(wins)


def noisy_codes(seed: int, circuit=(1, 4, 7), n: int = 40, n_heads: int = 12):
    """Every head takes random codes 0..5 on all prompts; circuit heads take a positive-only code 6..8 on half the
    positives. Noise gives almost every pair some positive-only code pair, which made the old selection count
    every pair."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 6, size=(2 * n, n_heads))
    positive = np.arange(2 * n) < n
    for h in circuit:
        hit = positive & (rng.random(2 * n) < 0.5)
        codes[hit, h] = rng.integers(6, 9, size=hit.sum())
    truth = np.isin(np.arange(n_heads), circuit)
    return codes, positive, truth


def test_edge_head_scores_equal_the_reference_selection_on_noisy_data():
    for seed in range(3):
        codes, positive, truth = noisy_codes(seed)
        for normalise in (False, True):
            expected = reference_edge_heads(codes, positive, normalise)
            pair_scores = edge_scores(torch.tensor(codes), torch.tensor(positive), normalise)
            ours = heads_from_edges(pair_scores)
            # a random tie order moves a head's count by at most a few entries: 1000 orders leave < 0.15 (1 s.d.)
            np.testing.assert_allclose(ours.numpy(), expected, atol=0.5)
            assert (pair_scores.fill_diagonal_(1) > 0).float().mean() > 0.9  # noisy: nearly every pair scores
            auc = roc_auc(ours, torch.tensor(truth))
            assert auc == mann_whitney_auc(ours.numpy(), truth)
            assert auc > 0.8 and mann_whitney_auc(expected, truth) > 0.8  # not the 0.5 of counting every pair


def test_hand_computed_selection_and_normalisation():
    # 3 heads: pair (0,1) best, then (1,2), then (0,2); n^2 // 2 = 4 entries = the two ordered copies of (0,1)
    scores = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    assert heads_from_edges(scores).tolist() == [2.0, 2.0, 0.0]
    assert heads_from_edges(scores, k=6).tolist() == [2.0, 3.0, 1.0]  # + one of (1,2), (2,1): the same heads
    assert heads_from_edges(scores, k=5).tolist() == [2.0, 2.5, 0.5]  # + h1 of (1,2) or of (2,1), half each
    # 4 heads: (0,1) scores 2; (0,2) and (2,3) tie at 1, and only 2 of their 4 ordered copies fit in 8 entries
    tied = torch.zeros(4, 4)
    tied[0, 1] = tied[1, 0] = 2
    tied[0, 2] = tied[2, 0] = tied[2, 3] = tied[3, 2] = 1
    assert heads_from_edges(tied).tolist() == [2 + 1, 2, 2, 1]  # each tied copy counts half for both its heads
    one_way = torch.zeros(3, 3)
    one_way[2, 0] = 1  # only the ordered pair (2, 0) scores: with k = 2 both its heads count once
    assert heads_from_edges(one_way, k=2).tolist() == [1, 0, 1]
    # positives see code pairs {(0,0), (1,1)}, negatives {(0,0), (2,2)}: one pair unique to positives
    codes = torch.tensor([[0, 0], [1, 1], [0, 0], [2, 2]])
    positive = torch.tensor([True, True, False, False])
    assert edge_scores(codes, positive)[0, 1] == 1
    assert edge_scores(codes, positive, normalise=True)[0, 1] == 1 / (2 + 2)  # / (|P| + |N|), not / |P u N|


def test_head_patching_effects_match_one_head_patched_by_hand(tiny_model):
    from analysis.circuit_heads import head_patching_effects

    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 1000, (4, 7), generator=generator)
    patch = torch.randint(3, 1000, (4, 7), generator=generator)
    target = 17

    def metric(logits):  # [batch, seq, vocab] -> [batch]
        return logits[:, -1, target]

    effects, names = head_patching_effects(tiny_model, clean, patch, metric, batch_heads=3)  # groups span layers
    assert names == [f"{layer}.{head}" for layer in range(2) for head in range(4)] and effects.shape == (8,)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(patch, names_filter=lambda name: name.endswith("attn.hook_z"))
        m_clean, m_patch = metric(tiny_model(clean)).mean(), metric(tiny_model(patch)).mean()
        for layer, head in ((0, 1), (1, 2)):
            hook = f"blocks.{layer}.attn.hook_z"

            def swap(z, hook, name=hook, head=head):
                z = z.clone()
                z[:, :, head] = cache[name][:, :, head]
                return z

            with tiny_model.hooks(fwd_hooks=[(hook, swap)]):
                m_one = metric(tiny_model(clean)).mean()
            expected = (m_clean - m_one) / (m_clean - m_patch)
            torch.testing.assert_close(effects[names.index(f"{layer}.{head}")], expected, atol=1e-5, rtol=1e-4)
    assert effects.abs().gt(1e-4).any()
