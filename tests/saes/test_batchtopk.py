"""BatchTopK identities of docs/methods.md §3.1: exact mean L0 in training, the calibrated threshold, threshold
inference and its export as a SAELens JumpReLU."""
import json

import pytest
import torch
from safetensors.torch import load_file

from saes import build_sae, calibrate_thresholds, load_sae, save_sae
from saes import ops
from saes.jumprelu import JumpReLUSAE
from training.synthetic import make_planted, mean_best_cosine
from training.trainer import LoopConfig, train_sae


def btk(**fields):
    return build_sae("batchtopk", **{"d_in": 16, "d_sae": 64, "k": 4, **fields})


def test_train_mean_l0_is_exactly_k_and_keeps_the_largest():
    sae = btk()
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # plenty of positive pre-activations, so the batch budget is filled
    x = torch.randn(50, 16)
    out = sae(x)
    assert int((out.codes != 0).sum()) == 4 * 50  # count_nonzero(Z) == k * B
    per_token = (out.codes != 0).sum(-1)
    assert per_token.min() < per_token.max()  # adaptive: tokens get different numbers of latents
    relu_u = out.pre_acts.relu()
    kept = out.codes != 0
    assert relu_u[kept].min() >= relu_u[~kept].max()
    torch.testing.assert_close(out.codes[kept], relu_u[kept])


def test_batch_topk_codes_with_few_positive_entries_keeps_only_positives():
    pre = -torch.ones(3, 5)
    pre[0, 1], pre[2, 4] = 2.0, 0.5
    codes = ops.batch_topk_codes(pre, k=2)
    assert int((codes != 0).sum()) == 2 and codes[0, 1] == 2.0 and codes[2, 4] == 0.5


def check_is_a_top(scores: torch.Tensor, positions: torch.Tensor, n_keep: int):
    """positions are n_keep distinct entries whose values are torch.topk's n_keep largest (NaN first)."""
    flat = scores.flatten()
    assert positions.numel() == n_keep and positions.unique().numel() == n_keep
    expected = flat.topk(n_keep).values.sort().values
    torch.testing.assert_close(flat[positions].sort().values, expected, rtol=0, atol=0, equal_nan=True)


# [batch, d_sae] with at least 2^20 scores and n_keep at most 1/8 of them: the sampled-threshold path
def test_batch_topk_positions_are_exactly_torch_topks_in_float64():
    scores = torch.randn(4096, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = ops.batch_topk_positions(scores, 4096 * 8)
    reference = scores.flatten().topk(4096 * 8).indices  # float64: no ties, so the same entries
    assert torch.equal(positions.sort().values, reference.sort().values)


@pytest.mark.parametrize("case", ["ties", "nan", "one column", "overshooting sample", "small", "dense share"])
def test_batch_topk_positions_keep_the_largest_values_whatever_the_scores(case):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 40, (2048, 1024), generator=generator).float()  # 40 values: ties everywhere
    n_keep = 2048 * 16
    if case == "nan":  # NaN ranks above everything, as in torch.topk; here off the sample, which then has none
        scores = torch.randn(2048, 1024, generator=generator)
        positions = torch.randperm(scores.numel(), generator=generator)[:200]
        positions = positions[positions % ops.sample_stride(scores.numel(), 1024) != 0][:50]
        scores.view(-1)[positions] = float("nan")
    elif case == "one column":  # every large score in one latent (column 513, which a stride of 16 would miss)
        scores = torch.randn(2048, 1024, generator=generator)
        scores[:, 513] += 20
        n_keep = 3000
    elif case == "overshooting sample":  # the sampled scores are the largest: fewer than n_keep pass, full top-k
        scores = torch.randn(2048, 1024, generator=generator)
        scores.view(-1)[::ops.sample_stride(scores.numel(), 1024)] = 100.0
        n_keep = 200_000
    elif case == "small":  # under 2^20 scores: torch.topk directly
        scores = scores[:100]
    elif case == "dense share":  # n_keep over 1/8 of the scores: torch.topk directly
        n_keep = scores.numel() // 4
    check_is_a_top(scores, ops.batch_topk_positions(scores, n_keep), n_keep)


def test_threshold_is_the_mean_smallest_kept_activation_of_training_batches():
    sae = btk()
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    smallest = []
    for x in batches:  # reference, from the definition: u, ReLU, the k*B largest of the batch, their minimum
        u = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach().relu().flatten()
        smallest.append(u.topk(4 * 32).values.min().item())
    calibrate_thresholds(sae, iter(batches), max_batches=3)  # only the first 3 batches count
    assert sae.threshold.item() == pytest.approx(sum(smallest[:3]) / 3, rel=1e-6)


def test_inference_is_a_global_threshold_and_refuses_without_one():
    sae = btk()
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(40, 16)
    u = sae.pre_acts(x)
    with pytest.raises(ValueError, match="batchtopk SAE has no calibrated inference threshold"):
        sae.encode(x)
    with pytest.raises(ValueError, match="calibrate_thresholds"):
        sae.to_jumprelu()
    sae.threshold.fill_(0.3)
    torch.testing.assert_close(sae.encode(x), u * (u > 0.3))
    torch.testing.assert_close(sae.encode(x[:7]), sae.encode(x)[:7])  # per token


def test_to_jumprelu_is_identical_and_saves_as_saelens_jumprelu(tmp_path):
    sae = btk(input_scale=2.0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3); sae.b_dec.normal_()
    sae.threshold.fill_(0.25)
    x = torch.randn(30, 16)
    jump = sae.to_jumprelu()
    assert isinstance(jump, JumpReLUSAE) and jump.cfg.apply_b_dec_to_input
    torch.testing.assert_close(jump.encode(x), sae.encode(x))
    torch.testing.assert_close(jump.decode(jump.encode(x)), sae.decode(sae.encode(x)))
    path = save_sae(jump, tmp_path / "jump")
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is True
    tensors = load_file(str(path / "sae_weights.safetensors"))
    torch.testing.assert_close(tensors["threshold"], torch.full((64,), 0.25))
    torch.testing.assert_close(load_sae(path).encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_threshold_round_trip_and_per_latent_refusal(tmp_path):
    sae = btk()
    sae.threshold.fill_(0.4)
    path = save_sae(sae, tmp_path / "btk", fold=False)
    assert load_file(str(path / "sae_weights.safetensors"))["threshold"].shape == (64,)
    assert load_sae(path).threshold.item() == pytest.approx(0.4)
    jump = sae.to_jumprelu()
    with torch.no_grad():
        jump.log_threshold[0] = 0.0
    jump_path = save_sae(jump, tmp_path / "jump")
    cfg = json.loads((jump_path / "cfg.json").read_text())
    cfg["saewb"]["architecture"] = cfg["architecture"] = "batchtopk"
    cfg["saewb"]["config"]["k"] = 4
    (jump_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture='jumprelu'"):
        load_sae(jump_path)


def test_planted_recovery_and_threshold_l0():
    planted = make_planted(d=32, n_true=96, mean_active=4, seed=3)
    sae = build_sae("batchtopk", d_in=32, d_sae=192, k=6)
    sae.init_b_dec(planted.sample(2048, torch.Generator().manual_seed(9)))
    history = train_sae(sae, planted.batches(512), 600, LoopConfig(lr=4e-3, warmup_steps=30, dead_tokens=50_000),
                        progress=False)
    assert history[-1]["fvu"] < 0.12  # seen 0.076-0.082 over three init seeds
    assert mean_best_cosine(sae.W_dec, planted.directions) > 0.78  # seen 0.83-0.84
    held_out = planted.sample(4096, torch.Generator().manual_seed(11))
    codes = sae.encode(held_out)
    assert abs((codes != 0).sum(-1).float().mean().item() - 6) < 0.15 * 6  # §3.1 test 3: within ±15% of k
    assert ops.fvu(held_out, sae.decode(codes)) < 0.13  # seen 0.081-0.085


def test_state_dict_carries_the_threshold():
    sae = btk()
    calibrate_thresholds(sae, [torch.randn(32, 16)])
    resumed = btk()
    resumed.load_state_dict(sae.state_dict())
    assert resumed.threshold.item() == sae.threshold.item() > 0
