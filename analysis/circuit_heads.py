"""SAE-based head-level circuit discovery (O'Neill & Bui 2024; docs/methods.md §10.1), simplified.

Per-head outputs are read at `blocks.L.attn.hook_z` ([batch, seq, heads, d_head], i.e. before W_O, unlike the paper's
z W_O in d_model) and averaged over positions (or the last position). One small TopK SAE (saes TopK trained with
training.trainer.train_sae, not the paper's ReLU+L1 with row-normalised weights) is shared by all heads and trained
on a few prompts; each (prompt, head) is discretised to argmax_i z_i; a head's node score is the number of codes seen
on positive prompts but never on negatives, |C+ \\ C-| (optionally / |C+ u C-|), softmaxed over heads. Labels are
explicit (no "first half are positives" assumption). Edge (head-pair) scores count code pairs seen on positives but
never on negatives (optionally / (|P| + |N|)); as in the reference code, the ordered pairs are sorted, the heads of the
first n^2 // 2 entries of the sorted pair list are counted, and the counts are softmaxed into a second head ranking.
`head_patching_effects` gives a ground truth to score them against: exact activation patching of every head.
"""
import math

import torch
from torch import Tensor

from saes import build_sae


@torch.no_grad()
def head_outputs(model, tokens: Tensor, reduce: str = "mean") -> tuple[Tensor, list[str]]:
    """Per-head outputs averaged over positions ('mean') or at the last one ('last'): [batch, n_heads_total, d_head],
    and the head names 'L.H'."""
    if reduce not in ("mean", "last"):
        raise ValueError(f"reduce must be 'mean' or 'last', got {reduce!r}.")
    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"The model has no per-head output hook {missing[0]!r}: head-level discovery needs hook_z.")
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
    per_layer = [cache[h].float() for h in hooks]  # each [batch, seq, heads, d_head]
    reduced = [z.mean(1) if reduce == "mean" else z[:, -1] for z in per_layer]
    names = [f"{layer}.{head}" for layer, z in enumerate(reduced) for head in range(z.shape[1])]
    return torch.cat(reduced, dim=1), names


def train_head_sae(outputs: Tensor, d_sae: int = 64, k: int = 4, steps: int = 300, n_train: int = 10,
                   seed: int = 0):
    """A TopK SAE shared by all heads, trained full-batch on the heads of `n_train` random prompts.
    outputs: [batch, n_heads, d_head]."""
    from training.trainer import LoopConfig, train_sae

    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(outputs.shape[0], generator=generator)[:n_train]
    rows = outputs[pick].reshape(-1, outputs.shape[-1])  # [n_train * n_heads, d_head]
    scale = 1.0 / max(rows.norm(dim=-1).median().item(), 1e-8)
    sae = build_sae("topk", seed=seed, d_in=outputs.shape[-1], d_sae=d_sae, k=min(k, d_sae), input_scale=scale)
    sae.init_b_dec(rows, "mean")
    train_sae(sae, (rows for _ in range(steps)), steps, LoopConfig(lr=1e-3, warmup_steps=0, dead_tokens=10**9),
              progress=False)
    return sae.requires_grad_(False)


@torch.no_grad()
def discretise(sae, outputs: Tensor) -> Tensor:
    """argmax_i z_i per (prompt, head): [batch, n_heads] long (by |z| for signed SAEs)."""
    codes = sae.encode(outputs)
    return (codes.abs() if sae.signed else codes).argmax(-1)


def node_scores(codes: Tensor, positive: Tensor, normalise: bool = False) -> Tensor:
    """|C+_h \\ C-_h| per head (optionally / |C+_h u C-_h|). codes [batch, n_heads]; positive [batch] bool."""
    positive = positive.to(torch.bool)
    scores = torch.zeros(codes.shape[1])
    for h in range(codes.shape[1]):
        pos, neg = set(codes[positive, h].tolist()), set(codes[~positive, h].tolist())
        scores[h] = len(pos - neg) / (len(pos | neg) if normalise else 1)
    return scores


def edge_scores(codes: Tensor, positive: Tensor, normalise: bool = False) -> Tensor:
    """score(h1, h2) = number of code pairs (c1, c2) seen on positive prompts but never on negatives, for h1 != h2;
    with `normalise`, divided by |P| + |N| (distinct pairs seen on positives plus those seen on negatives, as the
    reference's `unique_co_occurrences`). codes [batch, n_heads]; positive [batch] bool -> [n_heads, n_heads],
    symmetric, zero diagonal."""
    positive = positive.to(torch.bool)
    n_heads = codes.shape[1]
    scores = torch.zeros(n_heads, n_heads)
    rows = codes.tolist()
    labels = positive.tolist()
    for h1 in range(n_heads):
        for h2 in range(h1 + 1, n_heads):
            pos = {(r[h1], r[h2]) for r, p in zip(rows, labels) if p}
            neg = {(r[h1], r[h2]) for r, p in zip(rows, labels) if not p}
            value = len(pos - neg) / max(len(pos) + len(neg), 1) if normalise else len(pos - neg)
            scores[h1, h2] = scores[h2, h1] = value
    return scores


def heads_from_edges(pair_scores: Tensor, k: int | None = None) -> Tensor:
    """Head scores from the best pairs, as the reference's `edge_circuit_prediction`: sort all n^2 ordered pairs
    (h1, h2) by score (diagonal included, at 0), list their heads in turn (h1, h2, h1', h2', ...) and count how often
    each head is among the first `k` entries of that list (default n^2 // 2, i.e. the best n^2 / 4 ordered pairs).

    The reference leaves the order of tied pairs to numpy's default (unstable) sort; where a group of tied pairs
    straddles the cut, each of its pairs gets the share of the remaining entries it would get on average over
    tie orders (so no head wins by its index, e.g. when zero-score pairs fill the selection). With no tie at the
    cut this is the reference's count exactly. [n_heads, n_heads] -> [n_heads]."""
    n_heads = pair_scores.shape[0]
    k = n_heads * n_heads // 2 if k is None else k
    flat = pair_scores.flatten().float()  # [n^2] ordered pairs, row-major
    ranked = -flat.sort(descending=True).values  # ascending, for searchsorted
    start = torch.searchsorted(ranked, -flat, side="left")  # first slot of each pair's tie group
    size = torch.searchsorted(ranked, -flat, side="right") - start  # pairs in that group
    first_slots = (k + 1) // 2 - start  # slots j whose h1 (entry 2j) falls inside the first k entries...
    second_slots = k // 2 - start  # ...and whose h2 (entry 2j + 1) does, counted from the group's start
    share_first = first_slots.clamp(0, None).minimum(size) / size  # [n^2]
    share_second = second_slots.clamp(0, None).minimum(size) / size
    heads = torch.arange(n_heads)
    counts = torch.zeros(n_heads)
    counts.index_add_(0, heads.repeat_interleave(n_heads), share_first)  # h1 of pair (h1, h2)
    counts.index_add_(0, heads.repeat(n_heads), share_second)  # h2
    return counts


def roc_auc(scores: Tensor, truth: Tensor) -> float:
    """Probability that a true head outranks a false one (ties count half). truth: [n_heads] bool."""
    truth = truth.to(torch.bool)
    pos, neg = scores[truth], scores[~truth]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().sum() + 0.5 * (pos[:, None] == neg[None, :]).float().sum()
    return (greater / (len(pos) * len(neg))).item()


def best_f1(scores: Tensor, truth: Tensor) -> float:
    """Best F1 over thresholds that keep the top-n heads, n = 1..n_heads."""
    truth = truth.to(torch.bool)
    order = scores.argsort(descending=True)
    hits = truth[order].float().cumsum(0)
    n = torch.arange(1, len(scores) + 1).float()
    total = truth.sum().float()
    f1 = 2 * hits / (n + total)
    return f1.max().item() if total > 0 else float("nan")


def head_discovery(outputs: Tensor, positive: Tensor, names: list[str], truth: set[str] | None = None,
                   d_sae: int = 64, k: int = 4, steps: int = 300, n_train: int = 10, normalise: bool = False,
                   seed: int = 0) -> dict:
    """Train the head SAE, score heads, and (with ground-truth heads 'L.H') ROC-AUC and best F1."""
    if outputs.shape[0] != positive.shape[0]:
        raise ValueError(f"{outputs.shape[0]} prompts but {positive.shape[0]} labels: give one label per prompt.")
    if positive.all() or not positive.any():
        raise ValueError("Head scoring needs both positive and negative prompts.")
    sae = train_head_sae(outputs, d_sae, k, steps, n_train, seed)
    codes = discretise(sae, outputs)
    raw = node_scores(codes, positive, normalise)
    from_edges = heads_from_edges(edge_scores(codes, positive, normalise))
    result = {"heads": names, "scores": raw.tolist(), "softmax": torch.softmax(raw, 0).tolist(),
              "ranking": [names[i] for i in raw.argsort(descending=True).tolist()],
              "edge_head_scores": from_edges.tolist(), "edge_softmax": torch.softmax(from_edges, 0).tolist(),
              "edge_ranking": [names[i] for i in from_edges.argsort(descending=True).tolist()]}
    if truth:
        unknown = sorted(set(truth) - set(names))
        if unknown:
            raise ValueError(f"Ground-truth heads {unknown} are not heads of this model (names are 'layer.head').")
        mask = torch.tensor([n in truth for n in names])
        result |= {"roc_auc": roc_auc(raw, mask), "best_f1": best_f1(raw, mask),
                   "edge_roc_auc": roc_auc(from_edges, mask), "edge_best_f1": best_f1(from_edges, mask)}
    return result


@torch.no_grad()
def head_patching_effects(model, clean: Tensor, patch: Tensor, metric, batch_heads: int = 8
                          ) -> tuple[Tensor, list[str]]:
    """Exact activation patching of every head (the ground truth for head discovery when no published circuit
    can be loaded): for head L.H, the clean run with that head's `hook_z` at every position replaced by its value
    on the patch prompts; effect = mean(m(clean) - m(patched)) / mean(m(clean) - m(patch)), so a head carrying the
    whole behaviour scores 1. `metric(logits [batch, seq, vocab]) -> [batch]`. Heads are patched `batch_heads` at a
    time by stacking copies of the batch. Returns effects [n_heads_total] and names 'L.H'."""
    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    _, cache = model.run_with_cache(patch, names_filter=lambda name: name in hooks)
    patched_z = {h: cache[h] for h in hooks}  # each [batch, seq, heads, d_head]
    m_clean, m_patch = metric(model(clean)).mean(), metric(model(patch)).mean()
    n = clean.shape[0]
    heads = [(layer, head) for layer in range(n_layers) for head in range(patched_z[hooks[layer]].shape[2])]
    effects = []
    for start in range(0, len(heads), batch_heads):
        group = heads[start:start + batch_heads]

        def patch_hook(z: Tensor, hook, layer: int) -> Tensor:
            z = z.clone()
            for copy, (lay, head) in enumerate(group):
                if lay == layer:
                    z[copy * n:(copy + 1) * n, :, head] = patched_z[hooks[layer]][:, :, head]
            return z

        fwd = [(hooks[layer], lambda z, hook, layer=layer: patch_hook(z, hook, layer))
               for layer in sorted({lay for lay, _ in group})]
        with model.hooks(fwd_hooks=fwd):
            logits = model(clean.repeat(len(group), 1))  # [len(group) * batch, seq, vocab]
        effects += [(m_clean - metric(part).mean()).item() for part in logits.split(n)]
    denominator = (m_clean - m_patch).item()
    return torch.tensor(effects) / denominator, [f"{lay}.{head}" for lay, head in heads]


def planted_head_data(n: int = 40, n_heads: int = 12, d_head: int = 8, planted: int = 5, seed: int = 0
                      ) -> tuple[Tensor, Tensor]:
    """Synthetic head outputs: each head has its own fixed output plus small noise, identical in distribution on
    positives and negatives, except head `planted`, which takes a distinct direction only on positives.
    Returns outputs [2n, n_heads, d_head] and labels [2n] (positives first, but labelled explicitly)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_heads, d_head, generator=g)
    outputs = base + 0.01 * torch.randn(2 * n, n_heads, d_head, generator=g)
    direction = torch.randn(d_head, generator=g)
    outputs[:n, planted] += 3 * direction / direction.norm() * math.sqrt(d_head) / 2
    return outputs, torch.arange(2 * n) < n
