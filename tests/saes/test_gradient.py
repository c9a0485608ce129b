"""g-SAE (docs/methods.md §8.6): beta = 0 or g = 0 is TopK, the gradient can win a latent, values stay z,
gradients live in the scaled space, a clear error without gradients, save/load and planted recovery."""
import pytest
import torch

from saes import build_sae, load_sae, save_sae
from saes.gradient import GRAD_NORMALISATIONS
from training.synthetic import make_planted, mean_best_cosine, with_gradients
from training.trainer import LoopConfig, train_sae


def pair(d_in=16, d_sae=64, k=5, **fields):
    """A TopK SAE and a g-SAE with identical (randomised) weights."""
    topk = build_sae("topk", d_in=d_in, d_sae=d_sae, k=k)
    gsae = build_sae("gradient_topk", d_in=d_in, d_sae=d_sae, k=k, **fields)
    with torch.no_grad():
        topk.b_enc.normal_(0, 0.5)
        topk.b_dec.normal_(0, 0.5)
        for name, param in gsae.named_parameters():
            param.copy_(getattr(topk, name))
    return topk, gsae


def toy(beta, grad_normalisation="batch_rms", input_scale=1.0):
    """3 latents = the axes, k = 1; token 0 prefers latent 0 (z = 1) over latent 2 (z = 0.1)."""
    sae = build_sae("gradient_topk", d_in=3, d_sae=3, k=1, beta=beta, grad_normalisation=grad_normalisation,
                    input_scale=input_scale)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.eye(3))
    return sae


def test_beta_zero_or_zero_grad_is_topk():
    x, grad = torch.randn(256, 16) * 2, torch.randn(256, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    topk, gsae = pair(beta=0.0)
    expected = topk(x, dead_mask=dead)
    got = gsae(x, dead_mask=dead, grad=grad)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.loss, expected.loss)
    for mode in GRAD_NORMALISATIONS:
        topk, gsae = pair(beta=10.0, grad_normalisation=mode)
        expected = topk(x).codes
        assert torch.equal(gsae(x, grad=torch.zeros_like(x)).codes, expected)
        assert torch.equal(gsae.encode(x), topk.encode(x))  # inference is plain TopK (§8.3)
        assert not torch.equal(gsae(x, grad=grad).codes, expected)  # and the gradient does matter


def test_gradient_selects_a_small_but_important_latent():
    x = torch.tensor([[1.0, 0.9, 0.1], [1.0, 0.9, 0.1]])
    grad = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])  # token 0 cares about latent 2, token 1 about latent 1
    # score = z * (1 + beta * |<d_i, g_hat>|): latent 2 wins at beta = 10 (0.1 * 11 > 1), not at beta = 5
    codes = toy(beta=10.0)(x, grad=grad).codes
    torch.testing.assert_close(codes, torch.tensor([[0.0, 0.0, 0.1], [0.0, 0.9, 0.0]]))  # values are z, not the score
    codes = toy(beta=5.0)(x, grad=grad).codes
    torch.testing.assert_close(codes, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.9, 0.0]]))
    torch.testing.assert_close(toy(beta=10.0).encode(x), torch.tensor([[1.0, 0.0, 0.0]] * 2))


def test_gradient_is_taken_in_the_scaled_space():
    # The SAE works on s*x with s = 4, so dL/d(s x) = g / 4: with no normalisation latent 2 scores
    # 0.1 * (1 + |g_2| / 4), which beats latent 0 (z = 1) only when |g_2| > 36.
    x = torch.tensor([[1.0, 0.9, 0.1]]) / 4
    sae = toy(beta=1.0, grad_normalisation="none", input_scale=4.0)
    assert sae(x, grad=torch.tensor([[0.0, 0.0, 30.0]])).codes.argmax().item() == 0  # raw g would pick latent 2
    assert sae(x, grad=torch.tensor([[0.0, 0.0, 40.0]])).codes.argmax().item() == 2


def test_training_without_gradients_is_a_clear_error():
    sae = build_sae("gradient_topk", d_in=8, d_sae=32, k=4)
    assert sae.uses_grad
    x = torch.randn(16, 8)
    with pytest.raises(ValueError, match="grad"):
        sae(x)
    with pytest.raises(ValueError, match="grad"):
        train_sae(sae, iter([x]), 1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        sae(x, grad=torch.randn(16, 7))
    assert sae.encode(x).shape == (16, 32)  # inference needs no gradient
    with pytest.raises(ValueError, match="beta"):
        build_sae("gradient_topk", d_in=8, d_sae=32, beta=-1.0)
    with pytest.raises(ValueError, match="grad_normalisation"):
        build_sae("gradient_topk", d_in=8, d_sae=32, grad_normalisation="l2")


@pytest.mark.parametrize("mode", GRAD_NORMALISATIONS)
def test_save_load_round_trip(tmp_path, mode):
    _, sae = pair(beta=3.0, grad_normalisation=mode, input_scale=2.5)
    x, grad = torch.randn(128, 16), torch.randn(128, 16) * 7
    for fold in (False, True):  # the folded export selects the same latents from the same raw gradient
        loaded = load_sae(save_sae(sae, tmp_path / f"sae{fold}", fold=fold))
        assert loaded.cfg.beta == 3.0 and loaded.cfg.grad_normalisation == mode
        assert torch.equal(loaded(x, grad=grad).codes != 0, sae(x, grad=grad).codes != 0)
        torch.testing.assert_close(loaded(x, grad=grad).x_hat, sae(x, grad=grad).x_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)


def test_planted_recovery():
    # Measured on seeds 3-5: train FVU 0.091-0.095, inference (plain TopK) FVU 0.086-0.096, cosine 0.930-0.935.
    planted = make_planted(d=32, n_true=96, mean_active=4, seed=3)
    sae = build_sae("gradient_topk", d_in=32, d_sae=192, k=6, beta=1.0)
    sae.init_b_dec(planted.sample(2048, torch.Generator().manual_seed(9)))
    history = train_sae(sae, with_gradients(planted, 512), 600,
                        LoopConfig(lr=4e-3, warmup_steps=30, dead_tokens=50_000), progress=False)
    assert history[-1]["fvu"] < 0.15
    x = planted.sample(4096, torch.Generator().manual_seed(11))
    x_hat = sae.decode(sae.encode(x))
    assert ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item() < 0.15
    assert mean_best_cosine(sae.W_dec, planted.directions) > 0.9
