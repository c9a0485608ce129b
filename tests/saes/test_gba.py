"""GBA, group bias adaptation (docs/methods.md §9.3): the bias update direction and size on a hand toy; the Gaussian
first update; the window cadence; no sparsity loss and b_enc outside the optimiser; on a planted-dictionary stream the
alive latents fire within ±20 % of their group's target after training; groups, bounds, export."""
import json
import math

import pytest
import torch

from saes import build_sae, load_sae, save_sae
from saes.gba import GBASAE, expected_l0
from training.synthetic import make_planted
from training.trainer import LoopConfig, Trainer, train_sae


def toy(**fields) -> GBASAE:
    """d_in = d_sae = 4, identity encoder and decoder, b_dec = 0: u = x + b_enc, so firing is set by hand."""
    sae = build_sae("gba", d_in=4, d_sae=4, n_groups=2, freq_max=0.5, freq_min=0.1, dtype="float64",
                    **{"update_every": 1, "gaussian_start": False, **fields})
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(4, dtype=torch.float64))
    return sae


def toy_batch(n: int = 100) -> torch.Tensor:
    """Latent 0 fires on every token, latent 1 on half of them, latent 2 on a tenth, latent 3 never."""
    x = torch.zeros(n, 4, dtype=torch.float64)
    x[:, 0] = 1.0 + torch.arange(n) / n
    x[: n // 2, 1] = 1.0
    x[: n // 10, 2] = 1.0
    x[:, 3] = -1.0 - torch.arange(n) / n
    return x


def test_group_targets_are_geometric():
    sae = build_sae("gba", d_in=8, d_sae=40, n_groups=4, freq_max=0.1, freq_min=0.0001)
    assert sae.cfg.group_targets() == pytest.approx([0.1, 0.01, 0.001, 0.0001])
    assert sae.group_of_latent().tolist() == [g for g in range(4) for _ in range(10)]
    assert sae.target_frequency()[[0, 10, 39]].tolist() == pytest.approx([0.1, 0.01, 0.0001])
    assert expected_l0(sae.cfg) == pytest.approx(10 * 0.1111)
    assert build_sae("gba", d_in=8, d_sae=40, n_groups=1).cfg.group_targets() == [0.1]


def test_bias_update_direction_and_size_on_a_hand_toy():
    """Targets [0.5, 0.5, 0.1, 0.1]: latent 0 (fires always) is lowered, latent 1 (at its target) stays, latent 2 (at
    its target) stays, latent 3 (never fires) is raised; the steps are -η σ clamp(log(f/p))."""
    sae = toy()
    x = toy_batch()
    before = sae.b_enc.detach().clone()
    sae(x)
    sae.after_step()
    step = sae.b_enc.detach() - before
    assert step[0] < 0 and step[3] > 0
    assert step[1] == 0 and step[2] == 0
    frequency = torch.tensor([1.0, 0.5, 0.1, 0.5 / 100], dtype=torch.float64)
    target = torch.tensor([0.5, 0.5, 0.1, 0.1], dtype=torch.float64)
    spread = x.std(0, unbiased=False)
    expected = -0.3 * spread * (frequency / target).log().clamp(-6, 6)
    torch.testing.assert_close(step, expected)
    assert int(sae.bias_updates) == 1 and int(sae.window_steps) == 0 and float(sae.window_tokens) == 0


def test_adaptation_moves_each_latent_towards_its_target():
    sae = toy()
    x = toy_batch(1000)
    gaps = []
    for _ in range(30):
        sae(x)
        sae.after_step()
        frequency = (sae.encode(x) > 0).double().mean(0)
        gaps.append((frequency / sae.target_frequency()).log().abs())
    assert (gaps[-1][[0, 3]] < gaps[0][[0, 3]]).all()
    assert (gaps[-1] < math.log(1.2)).all(), gaps[-1]


def test_gaussian_first_update_places_biases_at_the_quantile():
    """On Gaussian inputs the first update (b = −(mean + σ Φ⁻¹(1 − p))) already gives frequencies near target."""
    sae = build_sae("gba", d_in=32, d_sae=64, n_groups=4, freq_max=0.2, freq_min=0.02, update_every=2,
                    dtype="float64")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, 32, generator=generator, dtype=torch.float64) for _ in range(2)]
    free = [(x - sae.b_dec) @ sae.W_enc.T for x in batches]
    for x in batches:
        sae(x)
        sae.after_step()
    v = torch.cat(free).detach()
    expected = -(v.mean(0) + v.std(0, unbiased=False) * torch.special.ndtri(1 - sae.target_frequency()))
    torch.testing.assert_close(sae.b_enc.detach(), expected)
    fresh = torch.randn(20000, 32, generator=generator, dtype=torch.float64)
    frequency = (sae.encode(fresh) > 0).double().mean(0)
    assert ((frequency / sae.target_frequency() - 1).abs() < 0.2).all()


def test_window_cadence_and_bias_outside_the_optimiser():
    sae = build_sae("gba", d_in=8, d_sae=32, update_every=3)
    assert not sae.b_enc.requires_grad
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3), 10)
    params = trainer.states["a"].params
    assert all(p is not sae.b_enc for p in params) and len(params) == 3
    generator = torch.Generator().manual_seed(0)
    start = sae.b_enc.detach().clone()
    for step in range(7):
        record = trainer.train_step({"x": torch.randn(64, 8, generator=generator)})["a"]
        assert set(record) >= {"mse"} and "auxk" not in record and "sparsity" not in record
        assert int(sae.bias_updates) == (step + 1) // 3
        assert torch.equal(sae.b_enc, start) == (step < 2)
    assert int(sae.window_steps) == 1 and float(sae.window_tokens) == 64


def test_no_sparsity_or_aux_loss_even_with_dead_latents():
    sae = build_sae("gba", d_in=8, d_sae=32)
    out = sae(torch.randn(16, 8), dead_mask=torch.ones(32, dtype=torch.bool))
    assert set(out.losses) == {"mse"}


def test_bias_bound():
    sae = toy(bias_max=0.0)
    with torch.no_grad():
        sae.b_enc.fill_(-0.01)
    sae(toy_batch())
    sae.after_step()
    assert (sae.b_enc <= 0).all() and sae.b_enc[3] == 0  # latent 3 wanted to rise above 0


def test_planted_stream_firing_frequencies_meet_their_group_targets():
    """After training on a planted-dictionary stream (fixed seed), every alive latent fires on held-out samples
    within ±20 % of its group's target frequency."""
    planted = make_planted(d=32, n_true=128, mean_active=5, seed=0)
    sae = build_sae("gba", d_in=32, d_sae=128, n_groups=4, freq_max=0.2, freq_min=0.02, update_every=8, seed=0)
    sae.init_b_dec(next(planted.batches(2048, seed=7)))
    history = train_sae(sae, planted.batches(1024, seed=1), 200, LoopConfig(lr=3e-3, warmup_steps=10),
                        progress=False)
    assert int(sae.bias_updates) == 25 and history[-1]["fvu"] < 0.3
    held_out = next(planted.batches(65536, seed=99))
    frequency = (sae.encode(held_out) > 0).double().mean(0)
    alive = frequency > 0
    assert alive.sum() >= 120
    relative = frequency[alive] / sae.target_frequency()[alive] - 1
    assert relative.abs().max() < 0.2, relative
    l0 = (sae.encode(held_out) > 0).sum(-1).double().mean()
    assert float(l0) == pytest.approx(expected_l0(sae.cfg), rel=0.1)


def test_distributed_statistics_are_averaged(tmp_path):
    """Under torch.distributed (one gloo rank here) the update goes through the all-reduce and gives the same biases."""
    import torch.distributed as dist

    local, shared = toy(), toy()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shared(toy_batch())
        shared.after_step()
    finally:
        dist.destroy_process_group()
    local(toy_batch())
    local.after_step()
    torch.testing.assert_close(shared.b_enc, local.b_enc)


def test_config_validation():
    for bad, match in [({"n_groups": 0}, "n_groups"), ({"n_groups": 33}, "n_groups"),
                       ({"freq_min": 0.2, "freq_max": 0.1}, "freq_min"), ({"freq_max": 1.0}, "freq_max"),
                       ({"update_every": 0}, "update_every"), ({"adapt_rate": 0.0}, "adapt_rate")]:
        with pytest.raises(ValueError, match=match):
            build_sae("gba", d_in=8, d_sae=32, **bad)


def test_saved_as_saelens_standard_and_loaded_back(tmp_path):
    sae = toy()
    sae(toy_batch())
    sae.after_step()
    path = save_sae(sae, tmp_path / "gba")
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is True
    assert cfg["saewb"]["architecture"] == "gba"
    loaded = load_sae(path)
    assert isinstance(loaded, GBASAE) and not loaded.b_enc.requires_grad
    x = toy_batch()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_b_dec_learns_from_the_decoder_only():
    """The encoder reads x − b_dec with b_dec held constant: b_dec's gradient is the decoder's, −2·mean(residual)."""
    sae = build_sae("gba", d_in=8, d_sae=32, dtype="float64")
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sae(x)
    out.loss.backward()
    torch.testing.assert_close(sae.b_dec.grad, -2 * (x - out.x_hat).detach().mean(0))
