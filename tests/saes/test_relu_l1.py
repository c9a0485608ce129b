"""ReLU + decoder-norm-weighted L1 identities of docs/methods.md §3.3: the penalty by hand, the free decoder,
folding decoder norms, λ = 0, the SAELens "standard" layout, and planted recovery."""
import json

import torch

from saes import build_sae, load_sae, save_sae
from training.synthetic import make_planted, mean_best_cosine
from training.trainer import LoopConfig, train_sae


def relu_l1(**fields):
    return build_sae("relu_l1", **{"d_in": 16, "d_sae": 64, **fields})


def test_sparsity_term_by_hand():
    sae = build_sae("relu_l1", d_in=2, d_sae=3, l1_coef=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.0]))
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]))  # row norms 5, 2, 1
        sae.b_dec.copy_(torch.tensor([10.0, 10.0]))  # not subtracted from the input by default
    x = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])
    # u = [[2, 2, 5], [-1, -0.5, -0.5]] -> z = [[2, 2, 5], [0, 0, 0]]
    out = sae(x)
    torch.testing.assert_close(out.codes, torch.tensor([[2.0, 2.0, 5.0], [0.0, 0.0, 0.0]]))
    expected = 0.5 * ((2 * 5 + 2 * 2 + 5 * 1) + 0.0) / 2  # λ * mean_tokens Σ z_i ||d_i||
    torch.testing.assert_close(out.losses["sparsity"], torch.tensor(expected))


def test_init_is_tied_at_norm_point_one_and_decoder_stays_free():
    sae = relu_l1()
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((64,), 0.1))
    x = torch.randn(256, 16)
    train_sae(sae, iter([x] * 20), 20, LoopConfig(lr=1e-2, warmup_steps=1), progress=False)
    norms = sae.W_dec.norm(dim=-1)
    assert (norms - 0.1).abs().max() > 1e-3 and (norms - 1).abs().max() > 1e-3  # not pinned to any norm


def test_folding_decoder_norms_keeps_reconstruction_and_loss():
    sae = relu_l1(l1_coef=0.3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) * 5 + 0.5)
        sae.b_enc.normal_(0, 0.2); sae.b_dec.normal_()
    x = torch.randn(40, 16)
    before, norms = sae(x), sae.W_dec.norm(dim=-1).detach()
    sae.fold_decoder_norm()
    after = sae(x)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(after.codes, before.codes * norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.x_hat, before.x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.loss, before.loss, atol=1e-5, rtol=1e-5)  # Σ z_i ||d_i|| is invariant


def test_lambda_zero_is_a_plain_relu_autoencoder():
    planted = make_planted(d=32, n_true=96, mean_active=4, seed=3)
    l0 = {}
    for coef in (0.0, 1.0):
        sae = build_sae("relu_l1", d_in=32, d_sae=192, input_scale=2.0, l1_coef=coef)
        history = train_sae(sae, planted.batches(512), 150, LoopConfig(lr=4e-3, warmup_steps=15), progress=False)
        assert coef > 0 or history[-1]["sparsity"] == 0
        l0[coef] = history[-1]["l0"]
    assert l0[0.0] > 100 and l0[0.0] > 3 * l0[1.0]  # seen ~177 vs ~30


def test_saved_as_saelens_standard_and_loaded_back(tmp_path):
    sae = relu_l1(input_scale=2.0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1); sae.b_dec.normal_()
    x = torch.randn(30, 16)
    path = save_sae(sae, tmp_path / "std")
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is False
    assert load_sae(path, architecture="relu_l1").encode(x).allclose(sae.encode(x), atol=1e-5)
    del cfg["saewb"]  # a folder written by SAELens itself: "standard" maps to relu_l1, its fields are read
    cfg["apply_b_dec_to_input"] = True
    (path / "cfg.json").write_text(json.dumps(cfg))
    foreign = load_sae(path)
    assert foreign.architecture == "relu_l1" and foreign.cfg.apply_b_dec_to_input


def test_planted_recovery():
    # Tuned for this toy: inputs scaled to E||x|| = sqrt(d), λ = 1, lr 4e-3 (λ = 5, the April-update value,
    # shrinks codes too much here: FVU ~0.66).
    planted = make_planted(d=32, n_true=96, mean_active=4, seed=3)
    sample = planted.sample(2048, torch.Generator().manual_seed(9))
    scale = (32**0.5 / sample.norm(dim=-1).mean()).item()
    sae = build_sae("relu_l1", d_in=32, d_sae=192, input_scale=scale, l1_coef=1.0)
    sae.init_b_dec(sample)
    history = train_sae(sae, planted.batches(512), 600, LoopConfig(lr=4e-3, warmup_steps=30, dead_tokens=50_000),
                        progress=False)
    assert history[-1]["fvu"] < 0.15  # seen 0.105-0.106 over two init seeds
    assert mean_best_cosine(sae.W_dec, planted.directions) > 0.88  # seen 0.93-0.94
