"""The SAE contract (docs/methods.md Appendix A), checked for every registered architecture.

Each case builds an architecture small. Fields come from DEFAULT_FIELDS, then FIELDS[name], then the case's own
overrides, filtered to the fields its config defines, so a new variant is covered as soon as it is registered;
add an entry to FIELDS only if the defaults cannot build it, and to EXTRA_CASES for a mode worth its own run.
"""
import dataclasses

import pytest
import torch

from saes import ARCHITECTURES, build_sae, calibrate_thresholds, load_sae, sae_class, save_sae
from saes.base import require_nonnegative
from training.trainer import LoopConfig, train_sae

D_IN, D_SAE = 16, 64
DEFAULT_FIELDS = dict(d_in=D_IN, d_sae=D_SAE, k=4)
FIELDS: dict[str, dict] = {
    "jumprelu": dict(threshold_init=0.05, bandwidth=0.05),
    "hierarchical_topk": dict(k_max=4),
}
EXTRA_CASES = [("abstopk", dict(selection="per_token"))]
BUDGET_FIELDS = ("k", "k_max")
"""Fields that count active latents per token, so must lie in 1..d_sae."""
BUDGET_MAY_EXCEED_D_SAE = {"matching_pursuit", "matching_pursuit_signed"}
"""MP's k counts pursuit steps, which may re-pick a latent."""
CODES_IN_RAW_UNITS_AFTER_FOLD = {"matching_pursuit", "matching_pursuit_signed"}
"""Folding the input scale s divides these codes by s (MP keeps unit atoms; see saes/mp.py); others keep codes."""

CASES = [pytest.param(name, {}, id=name) for name in ARCHITECTURES] + [
    pytest.param(name, extra, id=f"{name}-" + "-".join(f"{v}" for v in extra.values())) for name, extra in EXTRA_CASES
]


def config_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(sae_class(name).config_cls)}


def build(name: str, extra: dict, **more):
    fields = {**DEFAULT_FIELDS, **FIELDS.get(name, {}), **extra, **more}
    names = config_fields(name)
    return build_sae(name, **{key: value for key, value in fields.items() if key in names})


def data(n: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, D_IN, generator=generator) + 0.5


def forward(sae, x):
    grad = torch.randn_like(x) if sae.uses_grad else None
    return sae(x, dead_mask=torch.ones(D_SAE, dtype=torch.bool), grad=grad)


def trained(sae, steps: int = 4, lr: float = 1e-3):
    """A few real optimiser steps, so step hooks have run (thresholds estimated, decoder renormalised)."""
    def batches():
        seed = 1
        while True:
            x = data(64, seed)
            yield (x, torch.randn_like(x)) if sae.uses_grad else x
            seed += 1
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
    train_sae(sae, batches(), steps, LoopConfig(lr=lr, warmup_steps=1, dead_tokens=64), progress=False)
    return sae


@pytest.mark.parametrize("name, extra", CASES)
def test_shapes_losses_and_code_sign(name, extra):
    sae = build(name, extra)
    with torch.no_grad():  # pre-activations of both signs, so a dropped ReLU shows as negative codes
        if not sae.tied:
            sae.b_enc.normal_(-0.5, 1.0, generator=torch.Generator().manual_seed(0))
    calibrate_thresholds(sae, [data(64, seed) for seed in range(3)])
    x = data(24).reshape(2, 12, D_IN)
    codes = sae.encode(x)
    assert codes.shape == (2, 12, D_SAE)
    assert sae.decode(codes).shape == (2, 12, D_IN)
    assert sae.decode_no_bias(codes).shape == (2, 12, D_IN)
    if not sae.signed:
        assert (codes >= 0).all(), "an unsigned SAE produced negative codes"
    out = forward(sae, data())
    assert out.x_hat.shape == (64, D_IN) and out.codes.shape == (64, D_SAE)
    assert out.pre_acts is None or out.pre_acts.shape == (64, D_SAE)
    assert all(loss.ndim == 0 and torch.isfinite(loss) for loss in out.losses.values()), out.losses
    assert torch.isfinite(out.loss) and {"fvu", "l0"} <= set(out.metrics)


@pytest.mark.parametrize("name, extra", CASES)
def test_forward_reconstruction_is_decode_of_codes(name, extra):
    sae = trained(build(name, extra))
    x = data(seed=7)
    out = forward(sae, x)
    torch.testing.assert_close(out.x_hat, sae.decode(out.codes), atol=1e-5, rtol=1e-5)
    if not sae.batch_dependent and not sae.uses_grad:  # train and inference select alike
        torch.testing.assert_close(out.codes, sae.encode(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, extra", CASES)
def test_encode_never_depends_on_the_batch(name, extra):
    sae = trained(build(name, extra))
    x = data(40, seed=3)
    full = sae.encode(x)
    halves = torch.cat([sae.encode(x[:13]), sae.encode(x[13:])])
    torch.testing.assert_close(halves, full, atol=1e-5, rtol=1e-5)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.encode(x[perm]), full[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, extra", CASES)
def test_save_load_round_trip_of_a_checkpoint_is_exact(name, extra, tmp_path):
    sae = trained(build(name, extra, input_scale=2.5))
    x = data(32, seed=5)
    loaded = load_sae(save_sae(sae, tmp_path / name, fold=False), architecture=name)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=0, rtol=0)


@pytest.mark.parametrize("name, extra", CASES)
def test_save_load_of_the_folded_export(name, extra, tmp_path):
    s = 2.5
    sae = trained(build(name, extra, input_scale=s))
    x = data(32, seed=5)
    exported = sae.export_inference()
    loaded = load_sae(save_sae(sae, tmp_path / name), architecture=name)
    assert type(loaded) is type(sae) and loaded.cfg == exported.cfg and loaded.cfg.input_scale == 1.0
    torch.testing.assert_close(loaded.encode(x), exported.encode(x), atol=0, rtol=0)
    # Same reconstructions of raw activations; same codes, up to the variants that report raw-unit codes.
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    codes_scale = 1 / s if name in CODES_IN_RAW_UNITS_AFTER_FOLD else 1.0
    torch.testing.assert_close(loaded.encode(x), sae.encode(x) * codes_scale, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, extra", CASES)
def test_unit_decoder_rows_after_steps(name, extra):
    sae = build(name, extra)
    if not sae.unit_norm_decoder:
        pytest.skip(f"{name} leaves decoder norms free")
    trained(sae, steps=3, lr=3e-2)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)


def test_unknown_architecture_lists_the_registered_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        build_sae("no_such_sae", d_in=D_IN, d_sae=D_SAE)
    assert all(name in str(error.value) for name in ARCHITECTURES)
    path = save_sae(build("topk", {}), tmp_path / "sae")
    cfg = (path / "cfg.json").read_text().replace('"topk"', '"no_such_sae"')
    (path / "cfg.json").write_text(cfg)
    with pytest.raises(ValueError, match="registered architectures: .*topk"):
        load_sae(path)


@pytest.mark.parametrize("name, extra", CASES)
def test_budget_out_of_range_is_a_value_error(name, extra):
    budgets = [field for field in BUDGET_FIELDS if field in config_fields(name)]
    if not budgets:
        pytest.skip(f"{name} has no per-token budget field")
    for field in budgets:
        with pytest.raises(ValueError, match=field):
            build(name, extra, **{field: 0})
        if name not in BUDGET_MAY_EXCEED_D_SAE:
            with pytest.raises(ValueError, match=field):
                build(name, extra, **{field: D_SAE + 1})


@pytest.mark.parametrize("name, extra", CASES)
def test_wrong_width_is_a_value_error(name, extra):
    sae = build(name, extra)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae.encode(torch.randn(3, D_IN + 1))
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        forward(sae, torch.randn(3, D_IN - 1))


@pytest.mark.parametrize("name, extra", CASES)
def test_loading_as_another_architecture_is_a_value_error(name, extra, tmp_path):
    path = save_sae(build(name, extra), tmp_path / name)
    other = next(other for other in ARCHITECTURES if other != name)
    with pytest.raises(ValueError, match=f"holds a '{name}' SAE, not '{other}'"):
        load_sae(path, architecture=other)


@pytest.mark.parametrize("name, extra", CASES)
def test_signed_codes_are_refused_where_nonnegative_is_assumed(name, extra):
    sae = build(name, extra)
    if sae.signed:
        with pytest.raises(ValueError, match="max-activating examples assumes non-negative codes.*signed"):
            require_nonnegative(sae, "max-activating examples")
    else:
        require_nonnegative(sae, "max-activating examples")


BATCH_DEPENDENT_CASES = [case for case in CASES if build(*case.values).batch_dependent]


@pytest.mark.parametrize("name, extra", BATCH_DEPENDENT_CASES)
def test_batch_dependent_variants_infer_only_once_calibrated(name, extra):
    sae = build(name, extra)
    with pytest.raises(ValueError, match=f"{name} SAE has no calibrated inference threshold.*calibrate_thresholds"):
        sae.encode(data(8))
    trained(sae)  # train_sae calibrates at the end
    assert bool((sae.threshold >= 0).all())
    sae.encode(data(8))


def test_signedness_flags():
    assert build("abstopk", {}).signed and not build("topk", {}).signed
    assert build("batchtopk", {}).batch_dependent and not build("jumprelu", {}).batch_dependent
    assert build("abstopk", {}).batch_dependent and not build("abstopk", dict(selection="per_token")).batch_dependent
