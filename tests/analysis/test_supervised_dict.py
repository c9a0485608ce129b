"""Supervised (mean-difference) dictionaries and the SAE scored against them (analysis/supervised_dict.py,
docs/methods.md §10.7): a planted toy where everything is known, the greedy edit, and a smoke run on the tiny
model's IOI prompts."""
import math

import pytest
import torch

from analysis.supervised_dict import (greedy_edit, ioi_setup, score_dictionaries, supervised_dictionary,
                                      supervised_scores)
from saes import build_sae, save_sae

N_NAMES, D = 12, 256


def planted(seed: int = 0, noise: float = 0.01):
    """Activations = V_io[io] + V_s[s] + V_order[order] + noise over a full factorial design (every io, s and order,
    twice; io and s independent, so the mean differences are exactly the centred vectors), the same prompts with io
    replaced by another name, and a linear 'model': logit(name) = x.V_io[name] - x.V_s[name] (promote the IO,
    suppress the subject)."""
    g = torch.Generator().manual_seed(seed)
    vec = torch.nn.functional.normalize(torch.randn(2 * N_NAMES + 2, D, generator=g), dim=-1)
    V_io, V_s, V_order = vec[:N_NAMES], vec[N_NAMES:2 * N_NAMES], vec[2 * N_NAMES:]
    rows = [(a, b, o) for a in range(N_NAMES) for b in range(N_NAMES) for o in range(2) for _ in range(2)]
    io, s, order = (list(x) for x in zip(*rows))
    rng = torch.Generator().manual_seed(seed + 1)
    edit_to = [int(c) for c in torch.randint(0, N_NAMES - 2, (len(rows),), generator=rng)]
    edit_to = [sorted(set(range(N_NAMES)) - {a, b})[c] for a, b, c in zip(io, s, edit_to)]
    eps = noise * torch.randn(len(rows), D, generator=g)
    acts = V_io[io] + V_s[s] + V_order[order] + eps
    cf_acts = V_io[edit_to] + V_s[s] + V_order[order] + eps

    def readout(x):
        return x @ V_io.T - x @ V_s.T

    sae = build_sae("topk", d_in=D, d_sae=len(vec), k=3)
    with torch.no_grad():  # the decoder holds exactly the planted vectors; b_dec = b_enc = 0
        sae.W_dec.copy_(vec)
        sae.W_enc.copy_(vec)
    return {"acts": acts, "noise": eps, "cf_acts": cf_acts, "attributes": {"io": io, "s": s, "order": order}, "edit_to": edit_to,
            "readout": readout, "sae": sae, "V": {"io": V_io, "s": V_s, "order": V_order}}


@pytest.fixture(scope="module")
def toy():
    return planted()


def test_supervised_dictionary_recovers_the_planted_vectors(toy):
    sd = supervised_dictionary(toy["acts"], toy["attributes"])
    for name, V in toy["V"].items():
        centred = V - V.mean(0)  # the mean over an attribute's values is absorbed by the overall mean
        for value, u in sd.vectors[name].items():
            assert torch.cosine_similarity(u, centred[value], dim=0) > 0.99, (name, value)
    recon = sd.reconstruct(toy["attributes"])
    noiseless = toy["acts"] - toy["noise"]
    assert ((recon - noiseless).norm(dim=-1) / noiseless.norm(dim=-1)).max() < 0.05


def test_planted_toy_scores(toy):
    out = score_dictionaries(toy["acts"], toy["attributes"], toy["readout"], list(range(N_NAMES)), sae=toy["sae"],
                             edit="io", edit_to=toy["edit_to"], cf_acts=toy["cf_acts"], ks=(1, 2, 4))
    sup, sae = out["supervised"], out["sae"]
    assert out["reliable"] and "note" not in out
    # +1 for the IO and +1 against the subject, except on the 1/12 of prompts where they coincide (difference 0)
    assert out["logit_diff"]["clean"] == pytest.approx(2.0 * (N_NAMES - 1) / N_NAMES, abs=0.05)
    assert sup["sufficiency"] == pytest.approx(1.0, abs=0.03) and sae["sufficiency"] == pytest.approx(1.0, abs=0.05)
    assert sup["necessity"] == pytest.approx(1.0, abs=0.03)
    assert sup["necessity_by_attribute"]["io"] == pytest.approx(0.5, abs=0.05)  # IO carries half the difference
    assert abs(sup["necessity_by_attribute"]["order"]) < 0.05  # the read-out ignores the order
    assert sup["control"] == 1.0 and out["counterfactual_patch_control"] == 1.0
    assert sae["control"][2] == sup["control"]  # remove feature a, add feature b: two features suffice
    assert sae["control"][4] == sup["control"]
    assert sae["features_used"][1] == 1.0 and sae["features_used"][2] == pytest.approx(2.0)
    assert sae["l0"] == 3.0 and sae["best_cosine"]["io"] > 0.9 and sae["best_cosine"]["s"] > 0.9
    assert sae["best_cosine"]["order"] == pytest.approx(0.5 ** 0.5, abs=0.1)  # two values: atom ±(V0 - V1)/2


def test_greedy_edit_exchanges_the_right_features_and_respects_the_budget():
    sae = build_sae("topk", d_in=4, d_sae=4, k=2, input_scale=2.0)
    with torch.no_grad():
        sae.W_dec.copy_(2.0 * torch.eye(4))  # raw decoder rows: W_dec / s = identity
    codes = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    cf = torch.tensor([[0.0, 0.5, 3.0, 0.1]])
    target = torch.tensor([[-1.0, 0.0, 3.0, 0.1]])  # the full exchange's decoded change
    change, used = greedy_edit(sae, codes, cf, target, k=1)
    assert change.tolist() == [[0.0, 0.0, 3.0, 0.0]] and used.tolist() == [1]  # the largest gain first
    change, used = greedy_edit(sae, codes, cf, target, k=2)
    assert change.tolist() == [[-1.0, 0.0, 3.0, 0.0]] and used.tolist() == [2]
    change, used = greedy_edit(sae, codes, cf, target, k=10)
    assert torch.allclose(change, target) and used.tolist() == [3]  # unchanged codes are never candidates


def test_ioi_on_the_tiny_model_returns_finite_numbers(tiny_model, tmp_path):
    setup = ioi_setup(tiny_model, n_prompts=16)
    assert (setup.tokens != setup.cf_tokens).sum(1).eq(1).all()  # exactly the IO token changes
    assert all(b not in (a, s) for a, s, b in zip(setup.attributes["io"], setup.attributes["s"], setup.edit_to))
    hook = "blocks.1.hook_resid_post"
    sae = build_sae("topk", seed=1, d_in=tiny_model.cfg.d_model, d_sae=128, k=8, hook_name=hook)
    run_dir = tmp_path / "run"
    save_sae(sae, run_dir)
    out = supervised_scores(run_dir, n_prompts=16, ks=(1, 4), model=tiny_model)
    assert out["hook"] == hook and out["position"] == setup.tokens.shape[1] - 1
    numbers = [out["logit_diff"]["clean"], out["logit_diff"]["mean_ablation"], out["counterfactual_patch_control"],
               *(v for k, v in out["supervised"].items() if not isinstance(v, dict)),
               *out["supervised"]["necessity_by_attribute"].values(),
               out["sae"]["sufficiency"], out["sae"]["necessity"], *out["sae"]["control"].values(),
               *out["sae"]["control_logit_diff"].values(), *out["sae"]["best_cosine"].values()]
    assert all(math.isfinite(x) for x in numbers)
    assert set(out["sae"]["control"]) == {1, 4}
    # an attention-output (hook_z) SAE at the subject's second mention: heads flattened as in the cache
    z_hook = "blocks.0.attn.hook_z"
    z_sae = build_sae("topk", seed=2, d_in=tiny_model.cfg.n_heads * tiny_model.cfg.d_head, d_sae=64, k=4,
                      hook_name=z_hook)
    from analysis.supervised_dict import ioi_scores
    z_out = ioi_scores(tiny_model, z_sae, z_hook, position="s2", n_prompts=16, ks=(2,))
    assert math.isfinite(z_out["sae"]["sufficiency"]) and z_out["position"] == setup.positions["s2"]
