"""top-AFA (docs/methods.md §9.2): the kept prefix minimises |‖z̃‖ − ‖s·x − b_dec‖| among all prefixes (brute force);
an orthonormal dictionary recovers the full support of a sparse input; per-token L0 varies; the optional cap and
norm-matching term; the fast path equals the dense path in float64; folding the input scale keeps the codes."""
import pytest
import torch

from saes import build_sae, load_sae, save_sae

D_IN, D_SAE, BATCH = 12, 40, 48
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def afa(seed: int = 0, scale_rows: bool = True, **fields):
    """Random untied float64 weights, biases of both signs and (by default) decoder rows of unequal norms, so the
    decoder norms in the selection matter."""
    common = {"d_in": D_IN, "d_sae": D_SAE, "input_scale": 1.7, "dtype": "float64", "aux_k": 6}
    sae = build_sae("top_afa", seed=seed, **{**common, **fields})
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=generator, dtype=torch.float64))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=generator, dtype=torch.float64))
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=generator, dtype=torch.float64))
        if scale_rows:
            sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=generator, dtype=torch.float64))
    return sae


def batch(seed: int, n: int = BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=generator, dtype=torch.float64) * 2 + 0.3


def brute_force(sae, x: torch.Tensor, cap: int | None = None):
    """Per token: |‖z̃_j‖ − target| of every prefix j of the latents sorted by decreasing relu(u_i)‖d_i‖, each prefix's
    code built densely and its weighted norm taken directly. -> (gaps [batch, J], codes of every prefix)."""
    x_scaled = x * sae.input_scale
    acts = sae.pre_acts(x_scaled).detach().relu()
    norms = sae.W_dec.detach().norm(dim=-1)
    target = (x_scaled - sae.b_dec).detach().norm(dim=-1)
    gaps, codes = [], []
    for token in range(len(x)):
        order = torch.argsort(acts[token] * norms, descending=True)
        row_gaps, row_codes = [], []
        for j in range(1, (cap or D_SAE) + 1):
            code = torch.zeros(D_SAE, dtype=acts.dtype)
            code[order[:j]] = acts[token, order[:j]]
            row_gaps.append(float(((code * norms).norm() - target[token]).abs()))
            row_codes.append(code)
        gaps.append(row_gaps)
        codes.append(row_codes)
    return torch.tensor(gaps, dtype=torch.float64), codes


@pytest.mark.parametrize("cap", [None, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_prefix_minimises_the_norm_gap_among_all_prefixes(seed, cap):
    sae = afa(seed, k_cap=cap)
    x = batch(seed, 24)
    codes = sae.encode(x)
    gaps, prefix_codes = brute_force(sae, x, cap)
    x_scaled = x * sae.input_scale
    target = (x_scaled - sae.b_dec).detach().norm(dim=-1)
    chosen_gap = ((codes * sae.W_dec.detach().norm(dim=-1)).norm(dim=-1) - target).abs()
    torch.testing.assert_close(chosen_gap, gaps.min(dim=-1).values, rtol=1e-10, atol=1e-10)
    best = gaps.argmin(dim=-1)  # the first (smallest) minimising prefix
    for token in range(len(x)):
        torch.testing.assert_close(codes[token], prefix_codes[token][int(best[token])], rtol=0, atol=0)
    l0 = (codes != 0).sum(-1)
    assert l0.min() >= 1 and (cap is None or l0.max() <= cap)


def test_per_token_l0_varies():
    sae = afa(0)
    x = batch(0) * torch.linspace(0.2, 3.0, BATCH, dtype=torch.float64)[:, None]  # norms over a wide range
    l0 = (sae.encode(x) != 0).sum(-1)
    assert l0.min() < l0.max()


@pytest.mark.parametrize("with_b_dec", [False, True])
def test_orthonormal_dictionary_recovers_the_full_support(with_b_dec):
    """W_enc = W_dec = an orthonormal basis, b_enc = 0: for x = b_dec + Σ_{i∈S} a_i q_i with a_i > 0 the pre-
    activations are a on S and 0 elsewhere, and the prefix that matches ‖x − b_dec‖ is exactly S."""
    d = 16
    sae = build_sae("top_afa", d_in=d, d_sae=d, dtype="float64")
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_enc.copy_(q)
        sae.W_dec.copy_(q)
        if with_b_dec:
            sae.b_dec.copy_(torch.randn(d, generator=generator, dtype=torch.float64))
    n = 64
    support = torch.zeros(n, d, dtype=torch.bool)
    for token in range(n):
        size = 1 + token % 7
        support[token, torch.randperm(d, generator=generator)[:size]] = True
    a = (0.5 + torch.rand(n, d, generator=generator, dtype=torch.float64)) * support
    x = a @ q + sae.b_dec.detach()
    codes = sae.encode(x)
    assert torch.equal(codes != 0, support)
    torch.testing.assert_close(codes, a, rtol=1e-12, atol=1e-12)


def test_decoder_norms_enter_the_selection():
    """Doubling one decoder row doubles its latent's weight in the cumulative norm: a latent whose weighted norm alone
    matches the target is then kept alone."""
    sae = build_sae("top_afa", d_in=4, d_sae=4, dtype="float64")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # target sqrt(2)
    assert (sae.encode(x) != 0).sum() == 2  # c_1 = 1, c_2 = sqrt(2): both kept
    with torch.no_grad():
        sae.W_dec[0].mul_(2 ** 0.5)  # latent 0 alone now has weighted norm sqrt(2)
    assert (sae.encode(x) != 0).tolist() == [[True, False, False, False]]


def test_train_and_inference_select_alike_and_fold_keeps_codes(tmp_path):
    sae = afa(3)
    x = batch(3)
    out = sae(x)
    assert torch.equal(out.codes != 0, sae.encode(x) != 0)
    torch.testing.assert_close(out.codes, sae.encode(x), rtol=1e-12, atol=1e-12)
    exported = sae.export_inference()
    torch.testing.assert_close(exported.encode(x), sae.encode(x), rtol=1e-10, atol=1e-10)
    loaded = load_sae(save_sae(sae, tmp_path / "afa"), architecture="top_afa")
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_norm_matching_term(kernel):
    sae = afa(4, afa_coef=0.25, kernel=kernel)
    x = batch(4)
    out = sae(x)
    x_scaled = x * sae.input_scale
    code_norm = (out.codes * sae.W_dec.detach().norm(dim=-1)).norm(dim=-1)
    target = (x_scaled - sae.b_dec).norm(dim=-1)
    torch.testing.assert_close(out.losses["afa"], 0.25 * (code_norm - target).square().mean())
    assert "afa" not in afa(4)(x).losses


def test_config_validation_and_no_k():
    from saes.top_afa import TopAFAConfig
    names = {f for f in TopAFAConfig.__dataclass_fields__}
    assert "k" not in names and "k_max" not in names  # `saewb train --k` leaves top-AFA alone
    for bad, match in [({"k_cap": 0}, "k_cap"), ({"k_cap": D_SAE + 1}, "k_cap"), ({"afa_coef": -1.0}, "afa_coef"),
                       ({"kernel": "fused"}, "kernel")]:
        with pytest.raises(ValueError, match=match):
            build_sae("top_afa", d_in=D_IN, d_sae=D_SAE, **bad)
    assert build_sae("top_afa", d_in=D_IN, d_sae=D_SAE).fast_path
    assert build_sae("top_afa", d_in=D_IN, d_sae=D_SAE).adam_betas == (0.9, 0.99)


# ---- fast path ---------------------------------------------------------------------------------------------
def dead_mask(dead):
    if dead is None:
        return None
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[dead] = True
    return mask


@pytest.mark.parametrize("dead", [None, [], [3, 17], list(range(0, D_SAE, 2))], ids=["no_mask", "none", "few", "many"])
@pytest.mark.parametrize("fields", [{}, {"k_cap": 6}, {"afa_coef": 0.5}], ids=["plain", "cap", "afa"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_equals_dense(seed, fields, dead):
    dense = afa(seed, kernel="dense", **fields)
    fast = afa(seed, **fields)
    assert fast.fast_path and not dense.fast_path
    x = batch(seed)
    out_d, out_f = dense(x, dead_mask=dead_mask(dead)), fast(x, dead_mask=dead_mask(dead))
    torch.testing.assert_close(out_f.codes, out_d.codes)
    torch.testing.assert_close(out_f.x_hat, out_d.x_hat)
    assert set(out_d.losses) <= set(out_f.losses) and set(out_f.losses) - set(out_d.losses) <= {"auxk"}
    for name, value in out_f.losses.items():
        torch.testing.assert_close(value, out_d.losses.get(name, torch.zeros((), dtype=value.dtype)), msg=name)
    assert set(out_f.metrics) == set(out_d.metrics)
    for name, value in out_f.metrics.items():
        torch.testing.assert_close(value, out_d.metrics[name], msg=name)
    out_d.loss.backward()
    out_f.loss.backward()
    for name in PARAMS:
        torch.testing.assert_close(getattr(fast, name).grad, getattr(dense, name).grad, msg=name)
