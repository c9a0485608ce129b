"""The fast training path of the TopK family (saes/sparse_topk.py, docs/methods.md §2.1) equals each variant's dense
path (`kernel="dense"`) in float64: codes, reconstruction, every loss term and metric, and the gradient of every
parameter, over several seeds, with and without dead latents (AuxK), with tokens that have fewer positive
pre-activations than k, HierarchicalTopK's prefix losses, Multi-TopK's 4k term and g-SAE's gradient-informed
selection."""
import pytest
import torch

from saes import build_sae
from saes import ops
from saes.sparse_topk import Selection, fast_auxk, gather_pre_acts, sparse_decode

D_IN, D_SAE, BATCH = 12, 40, 48
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")

VARIANTS = {
    "topk": ("topk", dict(k=5)),
    "topk-multi": ("topk", dict(k=4, multi_topk=True)),
    "batchtopk": ("batchtopk", dict(k=5)),
    "mutual_choice": ("mutual_choice", dict(k=5)),
    "abstopk-per_token": ("abstopk", dict(k=5, selection="per_token")),
    "abstopk-batch": ("abstopk", dict(k=5, selection="batch")),
    "hierarchical-all": ("hierarchical_topk", dict(k_max=6, loss_chunk=7)),
    "hierarchical-pow2": ("hierarchical_topk", dict(k_max=6, budgets="pow2")),
    "hierarchical-list": ("hierarchical_topk", dict(k_max=6, budgets=[2, 5])),
    "gradient-batch_rms": ("gradient_topk", dict(k=5, beta=2.0)),
    "gradient-none": ("gradient_topk", dict(k=5, beta=5.0, grad_normalisation="none")),
    "gradient-multi": ("gradient_topk", dict(k=3, beta=1.0, grad_normalisation="per_token_unit", multi_topk=True)),
}
DEAD = {
    "no_mask": None,
    "none_dead": [],
    "few_dead": [3, 17],  # fewer dead latents than aux_k: k_aux = |dead|
    "many_dead": list(range(0, D_SAE, 2)),  # more than aux_k
}


def pair(architecture: str, fields: dict, seed: int, negative_bias: bool = False):
    """The same random (untied, biased) float64 weights in a dense-path and a fast-path SAE."""
    common = {"d_in": D_IN, "d_sae": D_SAE, "input_scale": 1.7, "dtype": "float64", "aux_k": 6, **fields}
    dense = build_sae(architecture, seed=seed, kernel="dense", **common)
    fast = build_sae(architecture, seed=seed, **common)
    assert fast.fast_path and not dense.fast_path
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        dense.W_enc.add_(0.3 * torch.randn(dense.W_enc.shape, generator=generator, dtype=torch.float64))
        dense.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=generator, dtype=torch.float64)
                          - (7.0 if negative_bias else 0.0))
        dense.b_dec.copy_(0.5 * torch.randn(D_IN, generator=generator, dtype=torch.float64))
    fast.load_state_dict(dense.state_dict())
    return dense, fast


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, D_IN, generator=generator, dtype=torch.float64) * 2 + 0.3
    grad = torch.randn(BATCH, D_IN, generator=generator, dtype=torch.float64)
    return x, grad


def dead_mask(name: str):
    dead = DEAD[name]
    if dead is None:
        return None
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[dead] = True
    return mask


def assert_same_step(dense, fast, x, grad, mask):
    out_d = dense(x, dead_mask=mask, grad=grad)
    out_f = fast(x, dead_mask=mask, grad=grad)
    torch.testing.assert_close(out_f.codes, out_d.codes)
    torch.testing.assert_close(out_f.x_hat, out_d.x_hat)
    torch.testing.assert_close(out_f.pre_acts, out_d.pre_acts.detach())
    # The dense path leaves AuxK out when no latent is dead; the fast path (no host sync) has it at exactly 0.
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
    return out_d, out_f


@pytest.mark.parametrize("dead", sorted(DEAD))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_equals_dense_values_and_gradients(variant, dead, seed):
    architecture, fields = VARIANTS[variant]
    dense, fast = pair(architecture, fields, seed)
    x, grad = batch(seed)
    assert_same_step(dense, fast, x, grad, dead_mask(dead))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_path_equals_dense_when_few_pre_activations_are_positive(variant):
    """A strongly negative b_enc: many tokens have fewer than k positive u, so selected values are ReLU'd to 0 (and
    batch rules keep zeros); AuxK's dead latents are mostly negative too."""
    architecture, fields = VARIANTS[variant]
    dense, fast = pair(architecture, fields, seed=5, negative_bias=True)
    x, grad = batch(5)
    out_d, _ = assert_same_step(dense, fast, x, grad, dead_mask("many_dead"))
    if not dense.signed:
        assert out_d.metrics["l0"] < fields.get("k", fields.get("k_max"))


def test_aux_k_zero_and_no_dead_latent_give_no_auxk_gradient():
    dense, fast = pair("topk", dict(k=5, aux_k=0), seed=0)
    x, _ = batch(0)
    out = fast(x, dead_mask=dead_mask("many_dead"))
    assert "auxk" not in out.losses
    _, fast = pair("topk", dict(k=5), seed=0)
    out = fast(x, dead_mask=dead_mask("none_dead"))
    assert out.losses["auxk"] == 0
    if out.losses["auxk"].requires_grad:  # on CPU the term is a constant; elsewhere a product with 0
        out.losses["auxk"].backward()
    assert all(getattr(fast, name).grad is None or not getattr(fast, name).grad.any() for name in PARAMS)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dead", ["none_dead", "few_dead", "many_dead"])
@pytest.mark.parametrize("dead_columns", [True, False])
def test_fast_auxk_equals_the_dense_loss_with_either_ranking(dead_columns, dead, signed):
    """AuxK ranked over the dead columns alone (CPU default) or over all latents with the live ones masked (the
    sync-free default elsewhere) gives ops.auxk_loss's value and gradients."""
    generator = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    W_enc, W_dec, b_enc, b_dec = (rand(D_SAE, D_IN), rand(D_SAE, D_IN), rand(D_SAE), rand(D_IN))
    params = [t.requires_grad_() for t in (W_enc, W_dec, b_enc, b_dec)]
    x, residual, mask = rand(BATCH, D_IN), rand(BATCH, D_IN), dead_mask(dead)
    pre = (x - b_dec) @ W_enc.T + b_enc
    expected = ops.auxk_loss(pre, residual, W_dec, mask, 6, signed=signed)
    x_centered = x - b_dec.detach()
    got = fast_auxk(pre.detach(), x_centered, residual, b_dec, W_enc, b_enc, W_dec, mask, 6, signed=signed,
                    dead_columns=dead_columns)
    torch.testing.assert_close(got, expected)
    if dead == "none_dead":
        assert got == 0
        return
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True, materialize_grads=True)
    for param, grad, want in zip("W_enc W_dec b_enc b_dec".split(), torch.autograd.grad(got, params), expected_grads):
        torch.testing.assert_close(grad, want, msg=param)


def test_auxk_gradient_reaches_only_dead_rows_on_the_fast_path():
    _, fast = pair("topk", dict(k=5), seed=3)
    x, _ = batch(3)
    mask = dead_mask("few_dead")
    fast(x, dead_mask=mask).losses["auxk"].backward()
    for name in ("W_enc", "W_dec"):
        rows = getattr(fast, name).grad.abs().sum(-1).nonzero().flatten().tolist()
        assert rows and set(rows) <= set(DEAD["few_dead"]), name
    assert set(fast.b_enc.grad.nonzero().flatten().tolist()) <= set(DEAD["few_dead"])


def test_input_gradient_and_codes_gradient_match_dense():
    """Gradients w.r.t. the input and through the lazily built dense codes are the dense path's."""
    dense, fast = pair("batchtopk", dict(k=4), seed=1)
    x, _ = batch(1)
    weights = torch.randn(BATCH, D_SAE, dtype=torch.float64)
    grads = []
    for sae in (dense, fast):
        xi = x.clone().requires_grad_()
        out = sae(xi, dead_mask=dead_mask("few_dead"))
        (out.loss + (out.codes * weights).sum()).backward()
        grads.append([xi.grad] + [getattr(sae, name).grad for name in PARAMS])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected)


def test_selection_layouts_agree():
    """A per-token selection and the same pairs as a flat list give the same gathers, decodes and gradients."""
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(9, 30, generator=generator, dtype=torch.float64)
    x_centered = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    W_enc = torch.randn(30, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(30, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    b_enc = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    b_dec = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    per_token = Selection.per_token(pre.topk(4, dim=-1).indices.sort(-1).values, 30)  # the flat order: by latent
    flat = Selection.from_flat((per_token.indices + 30 * torch.arange(9)[:, None]).flatten(), 9, 30)
    results = []
    for selection in (per_token, flat):
        values = gather_pre_acts(pre, x_centered, b_dec, W_enc, b_enc, selection)
        out = sparse_decode(values.relu(), W_dec, selection)
        grads = torch.autograd.grad(out.pow(2).sum(), [W_enc, W_dec, b_enc, b_dec])
        results.append((values.reshape(-1), out, grads, selection.to_dense(values)))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][3], results[1][3])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b)


def test_gather_after_a_topk_reuses_its_values_only_from_the_same_unchanged_scores(monkeypatch):
    """The first gather from the scores a top-k selected from (or a detached alias of them) returns the values the
    top-k read; from scores changed in place since, or from another tensor, it gathers again."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 40, generator=generator)
    reference = lambda dense, selection: dense.gather(-1, selection.indices)  # noqa: E731
    reused = Selection.topk(scores, 5)
    expected = reference(scores, reused)
    with monkeypatch.context() as patch:  # no gather runs: the top-k's values are handed over
        patch.setattr(torch.Tensor, "gather", lambda *a, **k: (_ for _ in ()).throw(AssertionError("gathered")))
        handed = reused.gather(scores.detach())
    assert torch.equal(handed, expected)
    again = reused.gather(scores)  # a second gather is a real one: no tensor is handed out twice
    assert torch.equal(again, expected) and again is not handed
    changed = Selection.topk(scores, 5)
    scores.mul_(-2)  # the same memory, another version
    assert torch.equal(changed.gather(scores), reference(scores, changed))
    other = Selection.topk(scores, 5)
    copy = scores.clone().add_(1)
    assert torch.equal(other.gather(copy), reference(copy, other))
    strided = scores[:, ::2]  # a view at the same address and of the same shape as scores[:, :20], other strides
    view = Selection.topk(strided, 5)
    assert torch.equal(view.gather(scores[:, :20]), reference(scores[:, :20], view))


def test_kernel_option_and_deprecated_sparse_kernel():
    assert build_sae("topk", d_in=8, d_sae=32, k=4).cfg.kernel == "sparse"
    assert build_sae("topk", d_in=8, d_sae=32, k=4, sparse_kernel=False).cfg.kernel == "dense"
    sae = build_sae("topk", d_in=8, d_sae=32, k=4, sparse_kernel=True)
    assert sae.cfg.kernel == "sparse" and sae.cfg.sparse_kernel is None
    with pytest.raises(ValueError, match="kernel"):
        build_sae("batchtopk", d_in=8, d_sae=32, k=4, kernel="fused")
    with pytest.raises(ValueError, match="sparse_kernel is replaced by kernel"):
        build_sae("topk", d_in=8, d_sae=32, k=4, sparse_kernel=True, kernel="dense")
    for name in ("topk", "batchtopk", "mutual_choice", "abstopk", "gradient_topk"):
        assert build_sae(name, d_in=8, d_sae=32, k=4).fast_path, name
    assert build_sae("hierarchical_topk", d_in=8, d_sae=32, k_max=4).fast_path
    assert not build_sae("feature_choice", d_in=8, d_sae=32, k=4).fast_path


def test_subclass_that_changes_select_alone_falls_back_to_dense():
    from saes.topk import TopKSAE

    class Shifted(TopKSAE):
        def select(self, pre_acts, *, train, x_scaled, grad):
            return super().select(pre_acts - 1.0, train=train, x_scaled=x_scaled, grad=grad)

    sae = Shifted(TopKSAE.config_cls(d_in=8, d_sae=32, k=4))
    assert not sae.fast_path


@pytest.mark.parametrize("variant", ["batchtopk", "mutual_choice", "abstopk-batch"])
def test_threshold_calibration_on_the_fast_path_equals_dense(variant):
    from saes import calibrate_thresholds

    architecture, fields = VARIANTS[variant]
    dense, fast = pair(architecture, fields, seed=4)
    batches = [batch(seed)[0] for seed in range(3)]
    calibrate_thresholds(dense, batches)
    calibrate_thresholds(fast, batches)
    assert float(dense.threshold) > 0
    torch.testing.assert_close(fast.threshold, dense.threshold)
