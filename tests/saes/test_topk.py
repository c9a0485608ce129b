"""TopK identities of docs/methods.md §2.7 and the shared base (§1.1, §1.3, §1.5)."""
import pytest
import torch

from saes import build_sae, load_sae, save_sae
from saes import ops
from training.synthetic import make_planted, mean_best_cosine
from training.trainer import DeadLatentCounter, LoopConfig, train_sae


def test_l0_is_k_and_tied_init():
    sae = build_sae("topk", d_in=16, d_sae=64, k=5)
    assert torch.equal(sae.W_enc, sae.W_dec)  # §2.7.3: tied at step 0
    x = torch.randn(200, 16) * 3
    codes = sae.encode(x)
    l0 = (codes != 0).sum(-1)
    assert (l0 <= 5).all()
    positive = (sae.pre_acts(x) > 0).sum(-1) >= 5
    assert (l0[positive] == 5).all()


def test_sparse_decode_matches_dense():
    W_dec = torch.randn(50, 8)
    pre = torch.randn(30, 50)
    values, indices = pre.topk(4, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values) @ W_dec
    torch.testing.assert_close(ops.sparse_decode(indices, values, W_dec), dense, atol=1e-5, rtol=1e-5)


def test_auxk_hand_computed_without_b_dec():
    # 4 latents, 2 dims; latents 2 and 3 dead; k_aux = 1.
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    pre = torch.tensor([[9.0, 9.0, 0.5, 0.2], [9.0, 9.0, -1.0, 0.25]])
    residual = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    dead = torch.tensor([False, False, True, True])
    # token 0 picks latent 2 (0.5) -> [0.5, 0.5]; token 1 picks latent 3 (0.25) -> [0, 0.5]
    num = (0.5**2 + 0.5**2) + (0.0 + 0.5**2)
    den = ((residual - residual.mean(0)) ** 2).sum()
    got = ops.auxk_loss(pre, residual, W_dec, dead, k_aux=1)
    assert torch.isclose(got, num / den)
    assert ops.auxk_loss(pre, residual, W_dec, torch.zeros(4, dtype=torch.bool), 1) == 0


def test_auxk_gives_live_rows_and_b_dec_no_gradient():
    sae = build_sae("topk", d_in=8, d_sae=32, k=2)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(64, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:16] = True
    pre = (x.detach() - sae.b_dec.detach()) @ sae.W_enc.T + sae.b_enc  # encoder input detached
    codes = ops.topk_codes(pre, 2)
    residual = x - (codes @ sae.W_dec + sae.b_dec)
    aux = ops.auxk_loss(pre, residual, sae.W_dec, dead, k_aux=4)
    aux.backward()
    assert sae.b_dec.grad is None or torch.all(sae.b_dec.grad == 0)
    assert torch.all(sae.W_dec.grad[16:] == 0)  # live latents untouched
    assert sae.W_dec.grad[:16].abs().sum() > 0


def test_projection_and_unit_norm_after_steps():
    sae = build_sae("topk", d_in=8, d_sae=32, k=4)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    out = sae(x)
    out.loss.backward()
    sae.after_backward()
    radial = (sae.W_dec.grad * sae.W_dec).sum(-1).abs()
    # fp32: the projection leaves a rounding residue of a few ulps of |grad| (eps 1.2e-7, summed over d_in = 8);
    # an unprojected gradient has a radial part of the order of |grad| itself.
    assert (radial <= 1e-5 * sae.W_dec.grad.norm(dim=-1) + 1e-9).all()
    train_sae(sae, iter([x] * 5), 5, LoopConfig(lr=1e-2, warmup_steps=1), progress=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)


def test_topk_codes_relu_the_selected_values():
    pre = torch.tensor([[3.0, -1.0, -2.0, -0.5], [-4.0, -3.0, 0.5, -1.0]])
    codes = ops.topk_codes(pre, 2)  # row 0 keeps 3 and -0.5, row 1 keeps 0.5 and -1: negatives become 0
    torch.testing.assert_close(codes, torch.tensor([[3.0, 0, 0, 0], [0, 0, 0.5, 0]]))


def test_multi_topk_term_has_sparsify_weight_relative_to_the_main_loss():
    sae = build_sae("topk", d_in=16, d_sae=64, k=2, multi_topk=True, aux_k=0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = sae(x)
    u = out.pre_acts.detach()

    def fvu_at(k):  # reference: sparsify's FVU of the top-k reconstruction
        values, indices = u.topk(k, dim=-1)
        x_hat = torch.zeros_like(u).scatter(-1, indices, values.relu()) @ sae.W_dec.detach() + sae.b_dec.detach()
        return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()

    # sparsify: loss = fvu(k) + fvu(4k) / 8, so the extra term is fvu(4k) / (8 fvu(k)) of the main one
    ratio = (out.losses["multi_topk"] / out.losses["mse"]).item()
    assert ratio == pytest.approx((fvu_at(8) / (8 * fvu_at(2))).item(), rel=1e-4)


def test_dead_counter_crosses_threshold_in_tokens():
    counter = DeadLatentCounter(d_sae=3, threshold=1000)
    codes = torch.zeros(300, 3)
    codes[:, 0] = 1.0
    for step in range(4):  # ceil(1000 / 300) = 4 steps
        assert not counter.dead_mask[1]
        counter.update(codes)
    assert counter.dead_mask[1] and not counter.dead_mask[0]
    codes[5, 1] = -0.1  # a single (signed) firing resets it
    counter.update(codes)
    assert not counter.dead_mask[1]


def test_permutation_invariance():
    sae = build_sae("topk", d_in=8, d_sae=16, k=3)
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(20, 8)
    perm = torch.randperm(16)
    other = build_sae("topk", d_in=8, d_sae=16, k=3)
    with torch.no_grad():
        other.W_enc.copy_(sae.W_enc[perm]); other.W_dec.copy_(sae.W_dec[perm])
        other.b_enc.copy_(sae.b_enc[perm]); other.b_dec.copy_(sae.b_dec)
    torch.testing.assert_close(other.encode(x), sae.encode(x)[:, perm])
    torch.testing.assert_close(other(x).x_hat, sae(x).x_hat, atol=1e-5, rtol=1e-5)


def test_fold_input_scale_is_exact(tmp_path):
    sae = build_sae("topk", d_in=8, d_sae=32, k=4, input_scale=3.5)
    with torch.no_grad():
        sae.b_dec.normal_(); sae.b_enc.normal_()
    x = torch.randn(50, 8)
    s = 3.5
    scaled_codes = sae.select(sae.pre_acts(s * x), train=False, x_scaled=s * x, grad=None)
    expected = (scaled_codes @ sae.W_dec + sae.b_dec) / s  # decode(encode(s x)) / s
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg.input_scale == 1.0
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), expected, atol=1e-5, rtol=1e-5)


def test_planted_recovery():
    planted = make_planted(d=32, n_true=96, mean_active=4, seed=3)
    sae = build_sae("topk", d_in=32, d_sae=192, k=6)
    sae.init_b_dec(planted.sample(2048, torch.Generator().manual_seed(9)))
    history = train_sae(sae, planted.batches(512), 600, LoopConfig(lr=4e-3, warmup_steps=30, dead_tokens=50_000),
                        progress=False)
    assert history[-1]["fvu"] < 0.15
    assert mean_best_cosine(sae.W_dec, planted.directions) > 0.9
