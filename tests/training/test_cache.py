"""Activation cache: equality with a direct run, resume, keys, masking, reader, and bad input."""
import dataclasses
import json
from collections import Counter

import pytest
import torch

import training.caching as caching
from training.activation_store import ActivationCache, CacheError, cache_key
from training.caching import CacheConfig, cache_activations
from training.model import check_hooks, stop_layer

HOOK0, HOOK1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def test_cached_activations_equal_run_with_cache(tiny_model, tiny_cache):
    tokens = tiny_cache.tokens(1)  # [contexts, ctx]
    with torch.no_grad():
        _, direct = tiny_model.run_with_cache(tokens, names_filter=[HOOK0, HOOK1])  # full forward, no early stop
    for hook in (HOOK0, HOOK1):
        cached = tiny_cache.read(1, f"acts.{hook}")
        torch.testing.assert_close(cached, direct[hook].reshape(-1, 64), atol=1e-5, rtol=1e-5)


def test_gradients_equal_direct_autograd(tiny_model, tmp_path):
    cfg = CacheConfig(model="tiny", hooks=[HOOK0], tokens=256, context_length=32, gradients=True, out=tmp_path / "g")
    cache = ActivationCache(cache_activations(cfg, model=tiny_model, progress=False))
    tokens = cache.tokens(0)
    store = {}

    def leaf(act, hook):
        store["act"] = act.detach().requires_grad_(True)
        return store["act"]

    with torch.enable_grad():
        logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK0, leaf)])
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
    torch.testing.assert_close(cache.read(0, f"grads.{HOOK0}"), store["act"].grad.reshape(-1, 64),
                               atol=1e-5, rtol=1e-4)


def test_resume_after_interruption_gives_the_same_cache(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path,
                                                        monkeypatch):
    cfg = dataclasses.replace(tiny_cache_cfg, out=tmp_path / "resumed")
    real, calls = caching.shard_tensors, []

    def dies_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(caching, "shard_tensors", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(cfg, model=tiny_model, progress=False)
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(cfg.out)
    assert len(json.loads((cfg.out / "progress.json").read_text())["shards"]) == 2
    monkeypatch.setattr(caching, "shard_tensors", real)
    resumed = ActivationCache(cache_activations(cfg, model=tiny_model, progress=False))
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in tiny_cache.manifest["shards"]]
    assert resumed.manifest["stats"] == tiny_cache.manifest["stats"]


def test_key_changes_with_every_key_field(tiny_model):
    base = CacheConfig(model="tiny", hooks=[HOOK0], tokens=1024, context_length=64)
    key = cache_key(base.key_fields("tok"))
    variants = [dict(model="smollm2"), dict(hooks=[HOOK1]), dict(corpus="other.txt"), dict(tokens=2048),
                dict(context_length=32), dict(dtype="bfloat16"), dict(gradients=True), dict(text_column="body")]
    keys = {cache_key(dataclasses.replace(base, **change).key_fields("tok")) for change in variants}
    keys.add(cache_key(base.key_fields("other-tokenizer")))
    assert key not in keys and len(keys) == len(variants) + 1
    assert cache_key(dataclasses.replace(base, batch_size=3, device="cpu").key_fields("tok")) == key


def test_special_tokens_and_outliers_are_masked(tiny_model, tiny_cache):
    tokens = tiny_cache.tokens(0)
    special = tiny_cache.read(0, "special").bool()
    assert special[:, 0].all()  # BOS at every context start
    specials = torch.tensor(tiny_model.tokenizer.all_special_ids)
    assert torch.equal(special, torch.isin(tokens, specials))
    keep = tiny_cache.keep_mask(0, HOOK0)
    assert not keep[special.reshape(-1)].any()
    stats = tiny_cache.stats(HOOK0)
    assert stats["n_special"] == sum(tiny_cache.read(i, "special").sum().item() for i in range(tiny_cache.n_shards))
    norms = tiny_cache.read(0, f"norms.{HOOK0}")
    strict = tiny_cache.keep_mask(0, HOOK0, outlier_factor=1.0)  # drop everything above the median
    assert torch.equal(strict, keep & (norms <= stats["median_norm"]))
    assert stats["n_kept"] == stats["n_tokens"] - stats["n_special"] - stats["n_outliers"]


def test_reader_is_deterministic_and_covers_every_kept_token(tiny_cache):
    first = list(tiny_cache.batches(HOOK0, 64, seed=3, buffer_tokens=1024))
    again = list(tiny_cache.batches(HOOK0, 64, seed=3, buffer_tokens=1024))
    other = list(tiny_cache.batches(HOOK0, 64, seed=4, buffer_tokens=1024))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert not torch.equal(first[0], other[0])
    kept = torch.cat([tiny_cache.shard_tokens(i, HOOK0) for i in range(tiny_cache.n_shards)])
    seen = torch.cat(first)
    assert len(kept) - len(seen) < 64  # only the last partial batch is dropped
    # every emitted row is a kept token, and none more often than it occurs (position-1 tokens can repeat)
    kept_counts = Counter(tuple(row.tolist()) for row in kept)
    seen_counts = Counter(tuple(row.tolist()) for row in seen)
    assert all(kept_counts[row] >= n for row, n in seen_counts.items())


def test_reader_pairs_gradients_with_activations(tiny_model, tmp_path):
    cfg = CacheConfig(model="tiny", hooks=[HOOK1], tokens=512, context_length=32, gradients=True, out=tmp_path / "g")
    cache = ActivationCache(cache_activations(cfg, model=tiny_model, progress=False))
    x, g = next(cache.batches(HOOK1, 16, seed=0, grads=True))
    acts, grads = cache.shard_tokens(0, HOOK1, grads=True)
    row = (acts == x[0]).all(-1).nonzero()[0, 0]
    assert torch.equal(grads[row], g[0])


def test_corrupted_shard_is_detected(tiny_model, tiny_cache_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cache_cfg, tokens=2048, out=tmp_path / "c")
    folder = cache_activations(cfg, model=tiny_model, progress=False)
    shard = folder / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupted"):
        ActivationCache(folder).read(0, f"acts.{HOOK0}")


def test_folder_of_another_model_or_hook_is_refused(tiny_model, tiny_cache, tiny_cache_cfg):
    with pytest.raises(CacheError, match="not 'smollm2'"):
        ActivationCache(tiny_cache.path, model="smollm2")
    with pytest.raises(CacheError, match="pick one of those"):
        ActivationCache(tiny_cache.path, hook="blocks.0.hook_mlp_out")
    other = dataclasses.replace(tiny_cache_cfg, hooks=[HOOK1])
    with pytest.raises(CacheError, match="different hooks"):
        cache_activations(other, model=tiny_model, progress=False)


def test_not_enough_disk_writes_nothing(tiny_model, tiny_cache_cfg, tmp_path, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(caching.shutil, "disk_usage", lambda path: Usage)
    cfg = dataclasses.replace(tiny_cache_cfg, out=tmp_path / "full")
    with pytest.raises(OSError, match="only 0.00 GB is free"):
        cache_activations(cfg, model=tiny_model, progress=False)
    assert not any(cfg.out.iterdir())


def test_hook_errors_name_the_fix(tiny_model):
    with pytest.raises(ValueError, match="Did you mean: blocks.0.hook_resid_post"):
        check_hooks(tiny_model, ["blocks.0.hook_resid_pots"])
    with pytest.raises(ValueError, match="layers 0..1"):
        check_hooks(tiny_model, ["blocks.5.hook_resid_post"])
    assert stop_layer([HOOK0], 2) == 1 and stop_layer([HOOK0, HOOK1], 2) is None
    assert stop_layer(["ln_final.hook_normalized"], 2) is None
