"""HierarchicalTopK identities of docs/methods.md §5.7: prefix property, J = {K} is TopK, Gram loss == brute force."""
import copy

import pytest
import torch

from saes import build_sae, load_sae, ops, save_sae
from saes.hierarchical_topk import prefix_sq_errors
from training.synthetic import make_planted, mean_best_cosine
from training.trainer import LoopConfig, train_sae


def make(seed=0, **fields):
    fields = {"d_in": 12, "d_sae": 48, "k_max": 8, **fields}
    sae = build_sae("hierarchical_topk", seed=seed, **fields)
    with torch.no_grad():  # untie and move off the init so every term of the loss matters
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_()
    return sae


def brute_force_loss(sae, x, budgets):
    """Reference: one TopK(j) reconstruction per budget, in a Python loop."""
    pre = sae.pre_acts(x * sae.input_scale)
    errors = [ops.mse_sum(x * sae.input_scale, ops.topk_codes(pre, j) @ sae.W_dec + sae.b_dec) for j in budgets]
    return torch.stack(errors).mean()


def test_budget_sets_and_validation():
    assert make(k_max=8).cfg.budget_list == list(range(1, 9))
    assert make(k_max=12, budgets="pow2").cfg.budget_list == [1, 2, 4, 8, 12]
    assert make(budgets=[8, 2, 2]).cfg.budget_list == [2, 8]
    for bad in ({"budgets": [0, 3]}, {"budgets": [9]}, {"budgets": "some"}, {"k": 9}, {"k_max": 49}, {"loss_chunk": -1}):
        with pytest.raises(ValueError):
            make(**bad)


@pytest.mark.parametrize("budgets", ["all", "pow2", [3, 8]])
def test_gram_loss_matches_brute_force_values_and_gradients(budgets):
    sae = make(budgets=budgets, input_scale=1.7)
    x = torch.randn(64, 12) * 2
    out = sae(x)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = torch.autograd.grad(out.losses["mse"], params)
    ref_loss = brute_force_loss(sae, x, sae.cfg.budget_list)
    ref = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(out.losses["mse"], ref_loss, rtol=1e-4, atol=1e-4)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_chunked_checkpointed_loss_matches_one_chunk():
    """§5.7.3/5: chunks of 7 tokens (recomputed in backward) give the same loss and gradients as one chunk."""
    chunked = make(loss_chunk=7)
    whole = copy.deepcopy(chunked)
    whole.cfg.loss_chunk = 0
    x = torch.randn(50, 12)
    losses = [sae(x).losses["mse"] for sae in (chunked, whole)]
    torch.testing.assert_close(losses[0], losses[1])
    for sae, loss in zip((chunked, whole), losses):
        loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(chunked, name).grad, getattr(whole, name).grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.fvu_curve(x), whole.fvu_curve(x))


def test_prefix_reconstruction_equals_topk():
    """§5.7.1: the sorted prefix of length k is TopK(k) of the same encoder, for every k <= K."""
    sae = make()
    x = torch.randn(40, 12)
    values, indices = sae.sorted_topk(sae.pre_acts(x))
    assert (values[:, :-1] >= values[:, 1:]).all()  # §5.5: sorted descending
    prefix = sae.b_dec + (values.unsqueeze(-1) * sae.W_dec[indices]).cumsum(1)  # [batch, K, d_in] naive cumsum
    errors = prefix_sq_errors(x - sae.b_dec, values, sae.W_dec[indices])
    for k in range(1, 9):
        topk = build_sae("topk", d_in=12, d_sae=48, k=k)
        topk.load_state_dict(sae.state_dict())
        expected = topk.decode(topk.encode(x))
        torch.testing.assert_close(sae.decode(sae.encode(x, k=k)), expected)
        torch.testing.assert_close(sae.with_k(k).decode(sae.with_k(k).encode(x)), expected)
        torch.testing.assert_close(prefix[:, k - 1], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(errors[:, k - 1], (x - expected).pow(2).sum(-1), atol=1e-4, rtol=1e-4)
    assert sae.cfg.k is None and (sae.encode(x) != 0).sum(-1).max() == 8  # the view did not change the original


def test_single_budget_is_topk_loss():
    """§5.7.2: with J = {K} the loss is TopK(K)'s loss (same mse_sum normalisation here)."""
    sae = make(budgets=[8])
    topk = build_sae("topk", d_in=12, d_sae=48, k=8)
    topk.load_state_dict(sae.state_dict())
    x = torch.randn(64, 12)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    out, ref = sae(x, dead_mask=dead), topk(x, dead_mask=dead)
    assert set(out.losses) == set(ref.losses) == {"mse", "auxk"}  # AuxK on the full-K residual
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], ref.losses[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["fvu_k8"], ref.metrics["fvu"], rtol=1e-4, atol=1e-5)


def test_save_load_keeps_k_and_outputs(tmp_path):
    sae = make(k=3, budgets="pow2", input_scale=2.5)
    x = torch.randn(30, 12)
    loaded = load_sae(save_sae(sae, tmp_path / "h"))
    assert loaded.cfg.k == 3 and loaded.cfg.budget_list == [1, 2, 4, 8] and loaded.cfg.input_scale == 1.0
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.encode(x, k=6), sae.encode(x, k=6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.fvu_curve(x), sae.fvu_curve(x), atol=1e-5, rtol=1e-5)


def test_planted_recovery_and_monotone_curve():
    """Trains at K = 8 on all budgets; FVU falls with k (§5.7.4) and the dictionary is recovered."""
    planted = make_planted(d=32, n_true=96, mean_active=4, seed=3)
    sae = build_sae("hierarchical_topk", d_in=32, d_sae=192, k_max=8)
    sae.init_b_dec(planted.sample(2048, torch.Generator().manual_seed(9)))
    history = train_sae(sae, planted.batches(512), 600, LoopConfig(lr=4e-3, warmup_steps=30, dead_tokens=50_000),
                        progress=False)
    curve = sae.fvu_curve(planted.sample(4096, torch.Generator().manual_seed(11)))
    # Observed over 3 seeds (torch CPU fp32): FVU(k=8) 0.087-0.093, FVU(k=4) 0.150-0.158, mean best cosine 0.907-0.913.
    assert (curve[1:] <= curve[:-1] + 1e-4).all()
    assert curve[-1] < 0.12 and curve[3] < 0.22
    assert history[-1]["fvu"] < 0.12
    assert mean_best_cosine(sae.W_dec, planted.directions) > 0.88


def test_prefix_errors_stay_fp32_under_bf16_autocast():
    """bf16 Gram matmuls err by ~1 on ||x||^2 ~ 600; the prefix errors must keep fp32 accuracy under autocast."""
    generator = torch.Generator().manual_seed(0)
    e0 = 3 * torch.randn(64, 64, generator=generator)  # ||e0||^2 ~ 576
    rows = torch.nn.functional.normalize(torch.randn(64, 8, 64, generator=generator), dim=-1)
    values = torch.rand(64, 8, generator=generator) * 2
    reference = prefix_sq_errors(e0.double(), values.double(), rows.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = prefix_sq_errors(e0, values, rows)
    assert errors.dtype == torch.float32
    torch.testing.assert_close(errors.double(), reference, atol=2e-3, rtol=1e-5)
