"""Direct feature attribution for attention-output (hook_z) SAEs (analysis/attn_dfa.py, docs/methods.md §10.6):
a hand-computed toy, exact sums on the tiny model, the value split against the model's own hook_z, and the Feature
page's Heads tab on a hook_z run."""
from pathlib import Path

import pytest
import torch

from analysis.attn_dfa import (context_dfa, head_attribution, head_parts, source_attribution, source_parts,
                               z_from_values)
from saes import build_sae

HOOK = "blocks.1.attn.hook_z"
ROOT = Path(__file__).resolve().parents[2]


def toy_sae(input_scale: float = 1.0):
    """d_in 2 (two heads of width 1), one latent: w = (2, -1), b_dec = (0.1, -0.2), b_enc = 0.5."""
    sae = build_sae("topk", d_in=2, d_sae=1, k=1, input_scale=input_scale)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[2.0, -1.0]]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.2]))
        sae.b_enc.copy_(torch.tensor([0.5]))
    return sae


TOY_PATTERN = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
                            [[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.5, 0.5]]])  # [heads 2, dest 3, src 3]
TOY_V = torch.tensor([[[1.0], [4.0]], [[2.0], [-2.0]], [[3.0], [2.0]]])  # [src 3, heads 2, d_head 1]


def test_hand_computed_toy_two_heads_three_positions():
    # destination 2: z_0 = .2*1 + .3*2 + .5*3 = 2.3, z_1 = 0*4 + .5*(-2) + .5*2 = 0
    z = z_from_values(TOY_PATTERN, TOY_V)
    assert z[2].flatten().tolist() == pytest.approx([2.3, 0.0])
    # head parts: 2 * 2.3 = 4.6 and -1 * 0 = 0; bias b_enc - w.b_dec = 0.5 - (0.2 + 0.2) = 0.1; u = 4.7
    parts, bias, pre = head_attribution(toy_sae(), z[2], 0)
    assert parts.tolist() == pytest.approx([4.6, 0.0], abs=1e-6)
    assert bias.item() == pytest.approx(0.1, abs=1e-6) and pre.item() == pytest.approx(4.7, abs=1e-6)
    # by source: head 0: 2 * (.2*1, .3*2, .5*3) = (.4, 1.2, 3.0); head 1: -1 * (0*4, .5*(-2), .5*2) = (0, 1, -1)
    sources, bias_s, pre_s = source_attribution(toy_sae(), TOY_PATTERN, TOY_V, 0, dest=2)
    assert sources.tolist() == [pytest.approx([0.4, 1.2, 3.0], abs=1e-6), pytest.approx([0.0, 1.0, -1.0], abs=1e-6)]
    assert bias_s.item() == pytest.approx(0.1, abs=1e-6) and pre_s.item() == pytest.approx(4.7, abs=1e-6)
    # the input scale multiplies z, not b_dec: s = 2 gives parts (9.2, 0), bias still 0.1, u = 9.3
    parts2, bias2, pre2 = head_attribution(toy_sae(2.0), z[2], 0)
    assert parts2.tolist() == pytest.approx([9.2, 0.0], abs=1e-6)
    assert bias2.item() == pytest.approx(0.1, abs=1e-6) and pre2.item() == pytest.approx(9.3, abs=1e-6)
    # destination 1: z = (.5*1 + .5*2, .25*4 + .75*(-2)) = (1.5, -0.5): parts (3.0, 0.5)
    parts1, _, pre1 = head_attribution(toy_sae(), z[1], 0)
    assert parts1.tolist() == pytest.approx([3.0, 0.5], abs=1e-6) and pre1.item() == pytest.approx(3.6, abs=1e-6)


def z_sae(d_in: int, **fields):
    """A small random TopK SAE on the flattened hook_z with non-zero b_dec, b_enc and input scale."""
    sae = build_sae("topk", seed=3, d_in=d_in, d_sae=32, k=4, input_scale=0.7, hook_name=HOOK, **fields)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
        sae.b_enc.copy_(0.5 * torch.randn(32, generator=g))
    return sae


@pytest.fixture(scope="module")
def tiny_z(tiny_model):
    ids = torch.tensor([[1] + tiny_model.tokenizer("Emma Woodhouse, handsome, clever, and rich, had lived",
                                                   add_special_tokens=False)["input_ids"]])
    names = [HOOK, "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v"]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ids, names_filter=names)
    return ids[0], cache[names[0]][0], cache[names[1]][0], cache[names[2]][0]


@pytest.mark.parametrize("token_norm", ["none", "layer_norm"])
def test_parts_plus_bias_are_the_pre_activation_on_the_tiny_model(tiny_model, tiny_z, token_norm):
    ids, z, pattern, v = tiny_z  # z [T, 4, 16], pattern [4, T, T], v [T, 2, 16] (grouped-query values)
    cfg = tiny_model.cfg
    assert z.shape[1:] == (cfg.n_heads, cfg.d_head) and v.shape[1] < cfg.n_heads
    sae = z_sae(cfg.n_heads * cfg.d_head, token_norm=token_norm)
    flat = z.reshape(len(ids), -1)  # head-major, as training/caching.py stores the hook
    x = flat
    if token_norm != "none":
        from saes.base import token_stats
        mean, divisor, _ = token_stats(flat, token_norm)
        x = (flat - mean) / divisor
    with torch.no_grad():
        expected = sae.pre_acts(x * sae.input_scale)  # [T, d_sae]: the SAE's own pre-activations
    latents = list(range(32))
    dfa = head_parts(sae, flat, latents, n_heads=cfg.n_heads)
    assert dfa.heads.shape == (len(ids), 32, cfg.n_heads)
    assert torch.allclose(dfa.pre_act, expected, atol=1e-5)
    assert (dfa.heads.sum(-1) + dfa.bias - expected).abs().max() < 1e-4
    assert dfa.bias.abs().min() > 0  # the b_dec / b_enc term is really exercised
    by_source = source_parts(sae, pattern, v, latents)  # every destination at once
    assert by_source.sources.shape == (len(ids), 32, cfg.n_heads, len(ids))
    assert (by_source.sources.sum((-1, -2)) + by_source.bias - expected).abs().max() < 1e-4
    assert (by_source.sources.sum(-1) - dfa.heads).abs().max() < 1e-4  # the source split refines the head split
    assert by_source.sources[:, :, :, -1][:-1].abs().max() == 0  # causal: no later source contributes
    parts, bias, pre = head_attribution(sae, z[5], 7)
    assert (parts.sum() + bias - expected[5, 7]).abs() < 1e-4 and pre == pytest.approx(expected[5, 7].item(), abs=1e-5)


def test_value_split_reproduces_hook_z_and_context_dfa_matches_the_codes(tiny_model, tiny_z):
    ids, z, pattern, v = tiny_z
    assert (z_from_values(pattern, v) - z).abs().max() < 1e-5
    sae = z_sae(z.shape[1] * z.shape[2])
    result = context_dfa(tiny_model, sae, HOOK, ids.tolist(), latent=5, dest=6)
    assert result["z_gap"] < 1e-5 and result["sources"].shape == (tiny_model.cfg.n_heads, 7)
    assert result["heads"].sum().item() + result["bias"] == pytest.approx(result["pre_act"], abs=1e-4)
    with torch.no_grad():
        code = sae.encode(z[6].reshape(1, -1))[0, 5].item()
        pre = sae.pre_acts(z[6].reshape(1, -1) * sae.input_scale)[0, 5].item()
    assert result["code"] == pytest.approx(code) and result["pre_act"] == pytest.approx(pre, abs=1e-5)
    assert len(result["tokens"]) == 7


def test_feature_page_shows_a_heads_tab_for_a_hook_z_run(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from analysis.features import FeaturesConfig, build_features
    from analysis.store import FeatureStore
    from app.cli import main

    run_dir = tmp_path / "runs" / "z"
    assert main(["demo", "--model", "tiny", "--hook", HOOK, "--tokens", "4096", "--run-dir", str(run_dir)]) == 0
    if not (run_dir / "features" / "index.json").is_file():
        build_features(FeaturesConfig(run_dir=run_dir, top_n=4, samples=4, progress=False))
    monkeypatch.setenv("SAEWB_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    store = FeatureStore(run_dir / "features")
    assert store.index["hook"] == HOOK
    latent = next(i for i in range(store.d_sae) if store.latent(i)["top"])
    at.query_params["latent"] = str(latent)
    at.switch_page("views/feature.py").run()
    assert not [e.value for e in at.exception] + [e.value for e in at.error]
    assert any(t.label == "Heads" for t in at.tabs)
    heads_tab = next(t for t in at.tabs if t.label == "Heads")
    assert len(heads_tab.get("plotly_chart")) == 2  # bar by head + heatmap over source tokens
    assert any("pre-activation" in c.value and "whole cached context" in c.value for c in heads_tab.caption)
