"""Steering (algorithms.md §10.4) on the tiny model with a small random TopK SAE at blocks.0."""
import pytest
import torch

from analysis.steering import (SteeringError, ablate, additive, clamp, decoder_direction, diff_in_means, generate,
                               gradient_steering, prompt_tokens, signed_steer, steering)
from analysis.steering_metrics import score, sweep, tradeoff_figure
from saes import build_sae

HOOK = "blocks.0.hook_resid_post"
PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    sae = build_sae("topk", d_in=64, d_sae=256, k=8, input_scale=5.0)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae.requires_grad_(False)


def logits_with(model, tokens, edit=None):
    with torch.no_grad(), steering(model, HOOK, edit, tokens.shape[1]):
        return model(tokens)


def test_alpha_zero_is_bit_identical(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    plain = logits_with(tiny_model, tokens)
    assert torch.equal(logits_with(tiny_model, tokens, additive(decoder_direction(sae, 3), 0.0)), plain)
    assert not torch.equal(logits_with(tiny_model, tokens, additive(decoder_direction(sae, 3), 4.0)), plain)


def test_clamp_to_current_value_is_a_no_op_and_equals_the_linear_formula(sae):
    torch.manual_seed(1)
    h = torch.randn(1, 1, 64) * 0.2
    codes = sae.encode(h)[0, 0]
    active = int(codes.argmax())
    assert torch.equal(clamp(sae, active, codes[active].item())(h, 1), h)
    for value in (0.0, 0.7, 3.0):
        expected = h + (value - codes[active]) * decoder_direction(sae, active)
        torch.testing.assert_close(clamp(sae, active, value)(h, 1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ablate(sae, active)(h, 1), h - codes[active] * decoder_direction(sae, active),
                               atol=1e-6, rtol=1e-5)


def test_positions_restrict_the_edit(sae):
    h = torch.zeros(1, 5, 64)
    direction = decoder_direction(sae, 0)
    prompt_only = additive(direction, 1.0, "prompt")(h, 3)
    generated_only = additive(direction, 1.0, "generated")(h, 3)
    assert prompt_only[0, :3].abs().sum() > 0 and prompt_only[0, 3:].abs().sum() == 0
    assert generated_only[0, :3].abs().sum() == 0 and generated_only[0, 3:].abs().sum() > 0


def test_hooks_are_removed_after_use_and_after_an_exception(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    plain = logits_with(tiny_model, tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny_model, HOOK, additive(decoder_direction(sae, 3), 10.0), tokens.shape[1]):
            raise RuntimeError("boom")
    assert torch.equal(logits_with(tiny_model, tokens), plain)
    generate(tiny_model, HOOK, tokens, additive(decoder_direction(sae, 3), 10.0), max_new_tokens=3)
    assert torch.equal(logits_with(tiny_model, tokens), plain)


def test_gradient_descent_steering_lowers_its_objective(tiny_model, sae):
    result = gradient_steering(tiny_model, sae, HOOK, PROMPT, ["Mr. Darcy", "Elizabeth Bennet"], steps=30)
    assert result.losses[-1] < 0.9 * result.losses[0]
    assert result.direction.shape == (64,)


def test_difference_in_means_of_identical_sets_is_zero(tiny_model):
    texts = ["Emma was handsome.", "Harriet was not."]
    assert torch.equal(diff_in_means(tiny_model, HOOK, texts, list(texts)), torch.zeros(64))
    assert diff_in_means(tiny_model, HOOK, texts, ["Something else entirely."]).abs().sum() > 0


def test_metrics_of_an_unsteered_run_are_zero_and_grow_with_alpha(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    out = generate(tiny_model, HOOK, tokens, None, max_new_tokens=5)
    target = [int(out[0, -1])]
    zero = score(tiny_model, sae, HOOK, out, tokens.shape[1], additive(decoder_direction(sae, 3), 0.0), 3, target)
    assert zero["kl"] == pytest.approx(0, abs=1e-6) and zero["off_target_changed"] == 0
    assert zero["target_logprob_change"] == pytest.approx(0, abs=1e-6)
    rows = sweep(tiny_model, sae, HOOK, PROMPT, 3, [0.0, 2.0, 8.0], max_new_tokens=4, target_ids=target)
    assert [r["alpha"] for r in rows] == [0.0, 2.0, 8.0]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6) and rows[2]["kl"] > rows[1]["kl"] > 0
    assert rows[2]["target_activation"] > rows[0]["target_activation"]
    assert len(tradeoff_figure(rows).data) == 1


def test_bad_input_is_explained(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    with pytest.raises(SteeringError, match="out of range"):
        decoder_direction(sae, 256)
    with pytest.raises(SteeringError, match="finite"):
        additive(decoder_direction(sae, 1), float("inf"))
    with pytest.raises(SteeringError, match="no hook"):
        with steering(tiny_model, "blocks.9.hook_resid_post", None, 1):
            pass
    with pytest.raises(SteeringError, match="empty"):
        prompt_tokens(tiny_model, "   ")
    with pytest.raises(SteeringError, match="context of 512"):
        generate(tiny_model, HOOK, tokens, None, max_new_tokens=600)
    with pytest.raises(SteeringError, match="not a signed SAE"):
        signed_steer(sae, 1, 2.0)
    with pytest.raises(SteeringError, match="non-negative"):
        clamp(sae, 1, -1.0)(torch.zeros(1, 1, 64), 1)


def test_signed_sae_steers_both_ways_and_lens_finds_latents(tiny_model):
    from analysis.steering_metrics import logit_lens_latents

    signed = build_sae("abstopk", d_in=64, d_sae=128, k=4, selection="per_token")
    h = torch.randn(1, 2, 64)
    minus = signed_steer(signed, 5, -2.0)(h, 2)
    torch.testing.assert_close(minus, h - 2.0 * decoder_direction(signed, 5))
    clamp(signed, 5, -1.0)(h, 2)  # negative clamps are fine for signed codes
    found = logit_lens_latents(tiny_model, signed, " the", n=3)
    scores = [s for _, s in found]
    assert len(found) == 3 and scores == sorted(scores, reverse=True)
