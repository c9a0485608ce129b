"""The two sources of training batches behind one interface: an iterator of {hook: x or (x, grad)} dicts.

- `cache_batches`: shuffled minibatches from an activation cache (this rank's shards).
- `model_batches`: activations computed on the fly from the model over the corpus, with the same masking
  (special tokens; outliers above `outlier_factor` x the median norm of the first batch), through a small
  shuffle buffer. Nothing is written to disk.
"""
from collections.abc import Iterator

import torch

from training.activation_store import ActivationCache
from training.caching import CacheConfig, hooked_forward
from training.corpus import iter_contexts, iter_texts, special_token_ids


def cache_batches(cache: ActivationCache, hooks: list[str], batch_size: int, *, seed: int, shards: list[int],
                  epochs: int, grads: bool) -> Iterator[dict]:
    yield from cache.batches(list(hooks), batch_size, seed=seed, shards=shards, epochs=epochs, grads=grads)


def model_batches(model, cfg: CacheConfig, hooks: list[str], batch_size: int, *, seed: int, grads: bool,
                  buffer_contexts: int = 64) -> Iterator[dict]:
    """Batches of `batch_size` kept tokens straight from the model; stops when the corpus slice is used up."""
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(special_token_ids(model.tokenizer))
    contexts = iter_contexts(model.tokenizer, iter_texts(cfg.corpus, cfg.text_column), cfg.context_length)
    medians: dict[str, float] = {}
    pool: list[torch.Tensor] = []
    pooled = 0
    for _ in range(0, cfg.n_contexts, cfg.batch_size):
        rows = [row for _, row in zip(range(cfg.batch_size), contexts)]
        if not rows:
            break
        tokens = torch.stack(rows).to(cfg.device)
        acts, grad = hooked_forward(model, tokens, hooks, grads)
        keep = ~torch.isin(tokens.cpu(), special).reshape(-1)
        columns = []
        for h in hooks:
            norms = acts[h].float().norm(dim=-1).cpu()
            medians.setdefault(h, norms[keep].median().item())
            if cfg.outlier_factor > 0:
                keep &= norms <= cfg.outlier_factor * medians[h]
        widths = [acts[h].shape[1] for h in hooks for _ in range(2 if grads else 1)]
        for h in hooks:
            columns.append(acts[h].float().cpu())
            if grads:
                columns.append(grad[h].float().cpu())
        pool.append(torch.cat(columns, dim=1)[keep])
        pooled += int(keep.sum())
        if pooled >= buffer_contexts * cfg.context_length:
            yield from _emit(pool, batch_size, hooks, widths, grads, generator, keep_rest=True)
            pooled = sum(len(p) for p in pool)
    if pool:
        yield from _emit(pool, batch_size, hooks, widths, grads, generator, keep_rest=False)


def _emit(pool: list, batch_size: int, hooks: list[str], widths: list[int], grads: bool, generator, keep_rest: bool):
    """Shuffle the pool and yield whole batches from it (half of it while streaming, all of it at the end)."""
    data = torch.cat(pool)
    data = data[torch.randperm(len(data), generator=generator)]
    emit = (len(data) // 2 if keep_rest else len(data)) // batch_size * batch_size
    for start in range(0, emit, batch_size):
        parts = data[start:start + batch_size].split(widths, dim=1)
        if grads:
            yield {h: (parts[2 * i], parts[2 * i + 1]) for i, h in enumerate(hooks)}
        else:
            yield {h: parts[i] for i, h in enumerate(hooks)}
    pool[:] = [data[emit:]] if keep_rest else []
