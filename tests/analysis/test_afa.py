"""The quasi-orthogonality diagnostics of analysis/afa.py (docs/methods.md §9.2): ε_LBO is 0 for an orthonormal
dictionary with exact codes, grows with the dictionary's coherence and never exceeds it for exact reconstructions; the
formula and the ZF fit by hand; the bias atom; every registered SAE goes through; the run-folder card and figure."""
import pytest
import torch

from analysis.afa import (afa_card, afa_metrics, decoder_coherence, epsilon_lbo, fit_zf, format_afa, zf_figure,
                          zf_norms)
from saes import ARCHITECTURES, build_sae, calibrate_thresholds
from tests.training.test_trainer import HOOK, job
from training.run import train


def relu_sae(dictionary: torch.Tensor, b_dec: torch.Tensor | None = None):
    """A ReLU SAE (GBA's class, biases left at 0) whose encoder and decoder are `dictionary` [n, d]: for
    x = b_dec + Σ a_i d_i with orthonormal rows and a ≥ 0 it returns a exactly."""
    n, d = dictionary.shape
    sae = build_sae("gba", d_in=d, d_sae=n, n_groups=1, dtype="float64")
    with torch.no_grad():
        sae.W_enc.copy_(dictionary)
        sae.W_dec.copy_(dictionary)
        if b_dec is not None:
            sae.b_dec.copy_(b_dec)
    return sae


def sparse_codes(n_tokens: int, n: int, active: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n_tokens, n, dtype=torch.float64)
    for token in range(n_tokens):
        chosen = torch.randperm(n, generator=generator)[:active]
        codes[token, chosen] = 0.5 + torch.rand(active, generator=generator, dtype=torch.float64)
    return codes


def orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_formula_by_hand():
    eps = epsilon_lbo(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 0.0]), d_sae=5)
    assert eps[0].item() == pytest.approx(abs(4 - 1) / (4 * 1))  # |‖z‖² − ‖f‖²| / ((h − 1)‖f‖²)
    assert eps[1].item() == 0 and torch.isnan(eps[2])
    with pytest.raises(ValueError, match="two latents"):
        epsilon_lbo(torch.ones(1), torch.ones(1), d_sae=1)


def test_orthonormal_dictionary_with_exact_codes_gives_zero():
    q = orthonormal(16)
    sae = relu_sae(q)
    codes = sparse_codes(200, 16, 4, seed=1)
    x = codes @ q
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-12, atol=1e-12)
    norms = zf_norms(sae, x)
    torch.testing.assert_close(norms["norm_f"], norms["norm_z"], rtol=1e-12, atol=1e-12)
    report = afa_metrics(sae, [x[:100], x[100:]])
    assert report["tokens"] == 200
    assert report["epsilon_lbo"]["median"] < 1e-14 and report["epsilon_lbo"]["mean"] < 1e-14
    assert report["zf"]["slope"] == pytest.approx(1.0, abs=1e-12)
    assert report["decoder"]["max_abs_cos"] < 1e-12


def test_bias_atom_orthogonal_to_the_dictionary_keeps_zero():
    """f̃ appends ‖b_dec‖ as one more atom (the authors' ZF plot): with b_dec orthogonal to every row, z = b_dec +
    Σ a_i d_i has ‖z‖ = ‖f̃‖; the centred pair ‖z − b_dec‖, ‖(f_i‖d_i‖)‖ agrees too."""
    q = orthonormal(16)
    rows, b_dec = q[:12], 3.0 * q[12]
    sae = relu_sae(rows, b_dec)
    codes = sparse_codes(100, 12, 3, seed=2)
    x = b_dec + codes @ rows
    report = afa_metrics(sae, [x])
    assert report["epsilon_lbo"]["mean"] < 1e-14 and report["epsilon_lbo_centered"]["mean"] < 1e-14
    norms = zf_norms(sae, x)
    torch.testing.assert_close(norms["norm_f"].square(), norms["norm_code"].square() + 9.0)


def mixed_dictionary(t: float, d: int = 16) -> torch.Tensor:
    """d unit rows: the identity (orthonormal) at t = 0, tilted towards random directions as t grows."""
    noise = torch.randn(d, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = torch.eye(d, dtype=torch.float64) + t * noise
    return rows / rows.norm(dim=-1, keepdim=True)


def test_epsilon_lbo_grows_with_coherence_and_stays_below_it():
    """Exact reconstructions x = Σ a_i d_i: ε_LBO is 0 for the orthonormal dictionary, grows with the dictionary's
    coherence, and never exceeds max |cos(d_i, d_j)| (it is a lower bound of the ε of quasi-orthogonality)."""
    medians, coherence = [], []
    codes = sparse_codes(300, 16, 4, seed=3)
    for t in (0.0, 0.1, 0.3, 1.0):
        rows = mixed_dictionary(t)
        x = codes @ rows
        eps = epsilon_lbo(x.norm(dim=-1), codes.norm(dim=-1), 16)  # f̃ = the exact codes (unit rows, b_dec = 0)
        bound = decoder_coherence(rows)["max_abs_cos"]
        assert (eps <= bound + 1e-12).all()
        medians.append(float(eps.median()))
        coherence.append(bound)
    assert medians[0] < 1e-14 and coherence[0] < 1e-14
    assert medians[1] < medians[2] < medians[3]
    assert coherence[1] < coherence[2] < coherence[3]


def test_random_dictionary_through_the_sae_is_nonzero():
    rows = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sae = relu_sae(rows / rows.norm(dim=-1, keepdim=True))
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = afa_metrics(sae, [x], max_tokens=300)
    assert report["tokens"] == 300 and report["epsilon_lbo"]["median"] > 1e-4


def test_fit_by_hand():
    z = torch.tensor([1.0, 2.0, 3.0, 4.0])
    fit = fit_zf(z, 2 * z)
    assert fit["slope"] == pytest.approx(2.0) and fit["correlation"] == pytest.approx(1.0)
    assert fit["over_activated"] == 1.0 and fit["under_activated"] == 0.0 and fit["mean_ratio"] == pytest.approx(2)
    assert fit_zf(torch.zeros(3), torch.ones(3))["slope"] is None


def test_decoder_coherence_subset_and_chunks():
    rows = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    full = decoder_coherence(rows, chunk=64)
    unit = rows / rows.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).abs().double()
    cos.fill_diagonal_(0)
    assert full["max_abs_cos"] == pytest.approx(float(cos.max()), rel=1e-6)
    assert full["mean_abs_cos"] == pytest.approx(float(cos.sum() / (300 * 299)), rel=1e-6)
    subset = decoder_coherence(rows, max_latents=50)
    assert subset["subset"] and subset["latents"] == 50 and subset["max_abs_cos"] <= full["max_abs_cos"] + 1e-9


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_registered_sae_goes_through(name):
    from tests.saes.test_contract import build, data

    sae = build(name, {}, input_scale=1.5)
    calibrate_thresholds(sae, [data(64, seed) for seed in range(3)])
    report = afa_metrics(sae, [data(64, 10), data(32, 11)])
    assert report["tokens"] == 96 and report["d_sae"] == sae.cfg.d_sae
    assert report["zf"]["slope"] is not None and report["zf"]["slope"] > 0
    assert report["epsilon_lbo"]["tokens"] > 0
    figure = zf_figure(report)
    assert len(figure.data) >= 3 and "ZF plot" in figure.layout.title.text
    assert name in format_afa(report)


def test_afa_card_on_a_run_folder(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path):
    cfg = job(tiny_cache_cfg, tmp_path / "run", architectures=["top_afa"], epochs=1, checkpoint_every=0)
    train(cfg, model=tiny_model, progress=False)
    card = afa_card(tmp_path / "run", max_tokens=1000)
    assert card["hook"] == HOOK and card["tokens"] == 1000 and card["architecture"] == "top_afa"
    # top-AFA aims at ‖z − b_dec‖; below it only where all its positive activations together fall short.
    assert 0.5 < card["zf_centered"]["slope"] < 1.1 and card["epsilon_lbo"]["median"] > 0
    assert (tmp_path / "run" / "eval" / "afa" / "metrics.json").is_file()
    assert (tmp_path / "run" / "eval" / "afa" / "zf.json").is_file()


def test_outlier_tokens_are_left_out_unless_asked():
    """Flagged outlier-norm tokens (as eval_tokens yields them) do not enter the ZF fit; include_outliers keeps them."""
    torch.manual_seed(0)
    sae = build_sae("topk", d_in=16, d_sae=64, k=4)
    x = torch.randn(200, 16)
    x[7] *= 50  # one token far out, as BOS-like outliers are on SmolLM2
    flags = torch.zeros(200, dtype=torch.bool)
    flags[7] = True
    contexts = torch.zeros(200, dtype=torch.long)
    chunks = [(x[:100], contexts[:100], flags[:100]), (x[100:], contexts[100:], flags[100:])]
    kept = afa_metrics(sae, chunks, coherence=False)
    assert kept["tokens"] == 199 and kept["outlier_tokens_left_out"] == 1
    assert kept["zf"] == afa_metrics(sae, [torch.cat([x[:7], x[8:]])], coherence=False)["zf"]
    everything = afa_metrics(sae, chunks, coherence=False, include_outliers=True)
    assert everything["tokens"] == 200 and everything["zf"] == afa_metrics(sae, [x], coherence=False)["zf"]
    only_outliers = [(x[7:8], contexts[7:8], flags[7:8]), (x[:50], contexts[:50], torch.zeros(50, dtype=torch.bool))]
    assert afa_metrics(sae, only_outliers, coherence=False)["tokens"] == 50  # a chunk of outliers only is skipped
