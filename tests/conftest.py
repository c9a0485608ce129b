"""Shared fixtures: the tiny model (random 2-layer Llama with a real BPE tokenizer) and a small cache of it.

Models and the corpus live in the normal cache (~/.cache/saewb or $SAEWB_CACHE) so they are built once;
activation caches are written under pytest's temporary folders.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

TINY_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="session")
def tiny_model():
    from training.model import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_cache_cfg(tmp_path_factory):
    from training.caching import CacheConfig

    return CacheConfig(model="tiny", hooks=list(TINY_HOOKS), tokens=8192, context_length=64, shard_tokens=2048,
                       out=tmp_path_factory.mktemp("cache") / "tiny")


@pytest.fixture(scope="session")
def tiny_cache(tiny_model, tiny_cache_cfg):
    """A finished 4-shard cache of the tiny model at two hooks (8,192 tokens, context 64)."""
    from training.activation_store import ActivationCache
    from training.caching import cache_activations

    return ActivationCache(cache_activations(tiny_cache_cfg, model=tiny_model, progress=False))
