"""Matryoshka BatchTopK (docs/methods.md §9.1): one group is BatchTopK exactly; each prefix reconstruction uses exactly
its first m_g latents (hand check); the fast path equals the dense path in float64; group configuration; threshold
inference and the SAELens-compatible JumpReLU export."""
import pytest
import torch

from saes import build_sae, calibrate_thresholds, load_sae, save_sae
from saes.jumprelu import JumpReLUSAE
from saes.matryoshka import MatryoshkaBatchTopKSAE
from training.trainer import LoopConfig, train_sae

D_IN, D_SAE, BATCH = 12, 40, 48
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
KERNELS = ("dense", "sparse")


def perturbed(sae, seed: int, negative_bias: bool = False):
    """Untied float64 weights with biases, so every gradient is non-trivial."""
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=generator, dtype=sae.W_enc.dtype))
        sae.b_enc.copy_(0.3 * torch.randn(sae.cfg.d_sae, generator=generator, dtype=sae.b_enc.dtype)
                        - (7.0 if negative_bias else 0.0))
        sae.b_dec.copy_(0.5 * torch.randn(sae.cfg.d_in, generator=generator, dtype=sae.b_dec.dtype))
    return sae


def batch(seed: int, n: int = BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=generator, dtype=torch.float64) * 2 + 0.3


def mask(dead: list[int] | None) -> torch.Tensor | None:
    if dead is None:
        return None
    out = torch.zeros(D_SAE, dtype=torch.bool)
    out[dead] = True
    return out


def grads(sae, out) -> list[torch.Tensor]:
    out.loss.backward()
    return [getattr(sae, name).grad for name in PARAMS]


def matryoshka(seed: int = 0, **fields):
    common = {"d_in": D_IN, "d_sae": D_SAE, "k": 5, "input_scale": 1.7, "dtype": "float64", "aux_k": 6}
    return perturbed(build_sae("matryoshka_batchtopk", seed=seed, **{**common, **fields}), seed)


# ---- one group is BatchTopK --------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dead", [None, [], [3, 17], list(range(0, D_SAE, 2))], ids=["no_mask", "none", "few", "many"])
def test_one_group_is_batchtopk(kernel, dead):
    common = {"d_in": D_IN, "d_sae": D_SAE, "k": 5, "input_scale": 1.7, "dtype": "float64", "aux_k": 6,
              "kernel": kernel}
    nested = perturbed(build_sae("matryoshka_batchtopk", seed=3, group_sizes=[D_SAE], **common), 3)
    plain = perturbed(build_sae("batchtopk", seed=3, **common), 3)
    x = batch(3)
    out_n, out_p = nested(x, dead_mask=mask(dead)), plain(x, dead_mask=mask(dead))
    assert torch.equal(out_n.codes, out_p.codes)
    assert set(out_n.losses) == set(out_p.losses)
    exact = kernel == "dense"  # the dense paths run the same operations; the fast paths sum in another order
    for name, value in out_n.losses.items():
        if exact:
            assert torch.equal(value, out_p.losses[name]), name
        else:
            torch.testing.assert_close(value, out_p.losses[name], msg=name)
    for name, a, b in zip(PARAMS, grads(nested, out_n), grads(plain, out_p)):
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(out_n.metrics["fvu"], out_p.metrics["fvu"])
    torch.testing.assert_close(out_n.metrics[f"fvu_m{D_SAE}"], out_p.metrics["fvu"])


# ---- the prefixes, by hand ---------------------------------------------------------------------------------
def identity_sae(kernel: str, weights=None):
    """d_in = d_sae = 8, encoder and decoder the identity, no biases, k = d_sae: the codes are relu(x) and prefix g
    reconstructs the first m_g coordinates of x."""
    sae = build_sae("matryoshka_batchtopk", d_in=8, d_sae=8, k=8, group_sizes=[2, 2, 4], group_weights=weights,
                    dtype="float64", kernel=kernel)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(8, dtype=torch.float64))
    return sae


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_prefix_uses_exactly_its_first_latents(kernel):
    sae = identity_sae(kernel)
    x = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [8.0, 7, 6, 5, 4, 3, 2, 1]], dtype=torch.float64)
    out = sae(x)
    torch.testing.assert_close(out.codes, x, rtol=0, atol=0)
    # Prefix m leaves coordinates m.. unexplained: squared errors per token are sums of squares of the tail.
    tails = {m: x[:, m:].square().sum(-1) for m in (2, 4, 8)}
    assert tails[8].abs().max() == 0
    expected_mse = sum(tails[m].mean() for m in (2, 4, 8)) / 3
    torch.testing.assert_close(out.losses["mse"], expected_mse, rtol=1e-12, atol=0)
    total = (x - x.mean(0)).square().sum()
    for m in (2, 4, 8):
        torch.testing.assert_close(out.metrics[f"fvu_m{m}"], tails[m].sum() / total, rtol=1e-12, atol=0)
    prefixes = sae.prefix_reconstructions(out.codes)
    for m, recon in zip((2, 4, 8), prefixes):
        expected = torch.zeros_like(x)
        expected[:, :m] = x[:, :m]
        torch.testing.assert_close(recon, expected, rtol=0, atol=0)
    # Changing a latent of the last group leaves the first two prefixes exactly as they were.
    with torch.no_grad():
        sae.W_dec[5].mul_(0.5)
    again = sae(x)
    for m in (2, 4):
        assert torch.equal(again.metrics[f"fvu_m{m}"], out.metrics[f"fvu_m{m}"])
    assert again.metrics["fvu_m8"] > 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("group", [0, 1, 2])
def test_gradient_of_one_prefix_reaches_only_its_latents(kernel, group):
    """With the weight of one prefix only, decoder and encoder rows beyond its m_g latents get no gradient."""
    weights = [0.0, 0.0, 0.0]
    weights[group] = 1.0
    sae = identity_sae(kernel, weights=weights)
    with torch.no_grad():
        sae.W_dec.add_(0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [8.0, 7, 6, 5, 4, 3, 2, 1]], dtype=torch.float64)
    sae(x).loss.backward()
    m = (2, 4, 8)[group]
    for name in ("W_dec", "W_enc"):
        rows = getattr(sae, name).grad.abs().sum(-1)
        assert rows[:m].gt(0).all() and not rows[m:].any(), (name, rows)


@pytest.mark.parametrize("kernel", KERNELS)
def test_group_weights_weight_the_prefix_errors(kernel):
    x = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [0.5, 1, 0, 2, 1, 0, 3, 1]], dtype=torch.float64)
    out = identity_sae(kernel, weights=[0.5, 2.0, 1.0])(x)
    tails = [x[:, m:].square().sum(-1).mean() for m in (2, 4, 8)]
    torch.testing.assert_close(out.losses["mse"], 0.5 * tails[0] + 2.0 * tails[1] + 1.0 * tails[2])


# ---- fast path ---------------------------------------------------------------------------------------------
FAST_CASES = {
    "default_groups": {},
    "three_groups": {"group_sizes": [4, 12, 24]},
    "fractions_weights": {"group_fractions": [0.25, 0.25, 0.5], "group_weights": [1.0, 0.5, 0.25]},
    "one_group": {"group_sizes": [D_SAE]},
}


@pytest.mark.parametrize("dead", [None, [], [3, 17], list(range(0, D_SAE, 2))], ids=["no_mask", "none", "few", "many"])
@pytest.mark.parametrize("case", sorted(FAST_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_equals_dense(case, dead, seed, negative_bias=False):
    fields = {"group_sizes": [2, 3, 5, 10, 20]} if case == "default_groups" else FAST_CASES[case]  # d_sae 40
    dense = matryoshka(seed, kernel="dense", **fields)
    fast = matryoshka(seed, **fields)
    fast.load_state_dict(dense.state_dict())
    assert fast.fast_path and not dense.fast_path
    if negative_bias:
        with torch.no_grad():
            for sae in (dense, fast):
                sae.b_enc.sub_(7.0)
    x = batch(seed)
    out_d, out_f = dense(x, dead_mask=mask(dead)), fast(x, dead_mask=mask(dead))
    torch.testing.assert_close(out_f.codes, out_d.codes)
    torch.testing.assert_close(out_f.x_hat, out_d.x_hat)
    # The dense path leaves AuxK out when no latent is dead; the fast path (no host sync) has it at exactly 0.
    assert set(out_d.losses) <= set(out_f.losses) and set(out_f.losses) - set(out_d.losses) <= {"auxk"}
    for name, value in out_f.losses.items():
        torch.testing.assert_close(value, out_d.losses.get(name, torch.zeros((), dtype=value.dtype)), msg=name)
    assert set(out_f.metrics) == set(out_d.metrics)
    for name, value in out_f.metrics.items():
        torch.testing.assert_close(value, out_d.metrics[name], msg=name)
    for name, a, b in zip(PARAMS, grads(fast, out_f), grads(dense, out_d)):
        torch.testing.assert_close(a, b, msg=name)


def test_fast_path_equals_dense_with_few_positive_pre_activations():
    test_fast_path_equals_dense("three_groups", list(range(0, D_SAE, 2)), 5, negative_bias=True)


# ---- configuration -----------------------------------------------------------------------------------------
def test_group_configuration():
    sae = build_sae("matryoshka_batchtopk", d_in=8, d_sae=64, k=4)
    assert sae.cfg.sizes == [4, 4, 8, 16, 32] and sae.cfg.boundaries == [4, 8, 16, 32, 64]
    assert sae.cfg.weights == [0.2] * 5
    fractions = build_sae("matryoshka_batchtopk", d_in=8, d_sae=30, k=4, group_fractions=(0.3, 0.3, 0.4))
    assert fractions.cfg.sizes == [9, 9, 12] and fractions.cfg.group_fractions == [0.3, 0.3, 0.4]  # list for json
    for bad, match in [({"group_sizes": [10, 10], "group_fractions": [0.5, 0.5]}, "not both"),
                       ({"group_sizes": [10, 10]}, "summing to d_sae=64"),
                       ({"group_sizes": [0, 64]}, "positive group sizes"),
                       ({"group_fractions": [0.5, 0.6]}, "sum to 1"),
                       ({"group_fractions": [0.5, -0.5, 1.0]}, "positive"),
                       ({"group_sizes": [32, 32], "group_weights": [1.0]}, "group_weights"),
                       ({"group_sizes": [32, 32], "group_weights": [0.0, 0.0]}, "group_weights")]:
        with pytest.raises(ValueError, match=match):
            build_sae("matryoshka_batchtopk", d_in=8, d_sae=64, k=4, **bad)
    with pytest.raises(ValueError, match="pass group_sizes explicitly"):
        build_sae("matryoshka_batchtopk", d_in=8, d_sae=8, k=2)  # 8/16 rounds to an empty group


# ---- inference, export, round trip -------------------------------------------------------------------------
def trained_sae():
    sae = build_sae("matryoshka_batchtopk", d_in=16, d_sae=64, k=4, input_scale=1.5)
    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) + 0.3 for i in range(6)]
    train_sae(sae, batches, 6, LoopConfig(lr=1e-3, warmup_steps=1, dead_tokens=64), progress=False)
    return sae


def test_threshold_inference_export_and_round_trip(tmp_path):
    sae = trained_sae()
    assert sae.threshold > 0  # train_sae calibrated it
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(9))
    u = sae.pre_acts(x * sae.input_scale)
    torch.testing.assert_close(sae.encode(x), u * (u > sae.threshold))
    jump = sae.to_jumprelu()
    assert isinstance(jump, JumpReLUSAE) and jump.cfg.metadata["converted_from"] == "matryoshka_batchtopk"
    torch.testing.assert_close(jump.encode(x), sae.encode(x))
    torch.testing.assert_close(jump.decode(jump.encode(x)), sae.decode(sae.encode(x)))
    loaded = load_sae(save_sae(sae, tmp_path / "m"), architecture="matryoshka_batchtopk")
    assert isinstance(loaded, MatryoshkaBatchTopKSAE) and loaded.cfg.sizes == sae.cfg.sizes
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    curve = sae.prefix_fvu(x)
    assert list(curve) == sae.cfg.boundaries
    with torch.no_grad():
        x_s = x * sae.input_scale
        full = ((x_s - sae.decode(sae.encode(x)) * sae.input_scale).square().sum()
                / (x_s - x_s.mean(0)).square().sum())
    assert curve[64] == pytest.approx(float(full), rel=1e-5)


def test_calibration_on_the_fast_path_equals_dense():
    dense, fast = matryoshka(4, kernel="dense"), matryoshka(4)
    fast.load_state_dict(dense.state_dict())
    batches = [batch(s) for s in range(3)]
    calibrate_thresholds(dense, batches)
    calibrate_thresholds(fast, batches)
    assert float(dense.threshold) > 0
    torch.testing.assert_close(fast.threshold, dense.threshold)


def test_default_training_infers_at_k_on_held_out_tokens(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path):
    """As BatchTopK (issue 12): `train` with default loop settings gives held-out L0 within ±10 % of k."""
    from tests.training.test_trainer import job
    from training.run import train

    cfg = job(tiny_cache_cfg, tmp_path / "m", architectures=["matryoshka_batchtopk"], k=[16], expansion=4, epochs=5,
              loop=LoopConfig(), checkpoint_every=0)
    summary = train(cfg, model=tiny_model, progress=False)["sae"]
    assert summary["steps"] >= 100 and summary["eval_split"] == "held-out shards"
    assert abs(summary["l0"] - 16) <= 0.1 * 16, f"held-out L0 {summary['l0']:.2f} at k=16"
