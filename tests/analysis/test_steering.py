"""Steering (docs/methods.md §10.4) on the tiny model with a small random TopK SAE at blocks.0."""
import pytest
import torch

from analysis.steering import (Span, SteeringError, ablate, additive, clamp, decoder_direction, dense_prototype_offset,
                               diff_in_means, generate, gradient_descent, per_row, prompt_tokens, prototype_code,
                               signed_steer, steering)
from analysis.steering_metrics import score, sweep, tradeoff_figure
from saes import build_sae

HOOK = "blocks.0.hook_resid_post"
PROMPT = "It is a truth universally acknowledged"
CONCEPT = ["Mr. Darcy", "Elizabeth Bennet"]


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    sae = build_sae("topk", d_in=64, d_sae=256, k=8, input_scale=5.0)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae.requires_grad_(False)


def logits_with(model, tokens, edit=None, prompt_len=None):
    with torch.no_grad(), steering(model, HOOK, edit, Span.of(model, tokens, prompt_len)):
        return model(tokens)


def plain_span(length: int, prompt_len: int) -> Span:
    """A span without special tokens."""
    return Span(prompt_len, torch.zeros(1, length, dtype=torch.bool))


def hook_acts(model, tokens, edit=None, prompt_len=None):
    """The activations at HOOK as the rest of the model sees them (after the edit): [pos, d]."""
    seen = {}

    def grab(h, hook):
        seen["h"] = h.detach().clone()
        return h

    with torch.no_grad(), steering(model, HOOK, edit, Span.of(model, tokens, prompt_len)):
        with model.hooks(fwd_hooks=[(HOOK, grab)]):  # registered after the edit, so it sees the edited tensor
            model(tokens)
    return seen["h"][0]


def test_alpha_zero_is_bit_identical(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    plain = logits_with(tiny_model, tokens)
    assert torch.equal(logits_with(tiny_model, tokens, additive(decoder_direction(sae, 3), 0.0)), plain)
    assert not torch.equal(logits_with(tiny_model, tokens, additive(decoder_direction(sae, 3), 4.0)), plain)


def test_clamp_to_current_value_is_a_no_op_and_equals_the_linear_formula(sae):
    torch.manual_seed(1)
    h = torch.randn(1, 1, 64) * 0.2
    span = plain_span(1, 1)
    codes = sae.encode(h)[0, 0]
    active = int(codes.argmax())
    assert torch.equal(clamp(sae, active, codes[active].item())(h, span), h)
    for value in (0.0, 0.7, 3.0):
        expected = h + (value - codes[active]) * decoder_direction(sae, active)
        torch.testing.assert_close(clamp(sae, active, value)(h, span), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ablate(sae, active)(h, span), h - codes[active] * decoder_direction(sae, active),
                               atol=1e-6, rtol=1e-5)


def test_positions_restrict_the_edit(sae):
    h = torch.zeros(1, 5, 64)
    direction = decoder_direction(sae, 0)
    prompt_only = additive(direction, 1.0, "prompt")(h, plain_span(5, 3))
    generated_only = additive(direction, 1.0, "generated")(h, plain_span(5, 3))
    assert prompt_only[0, :3].abs().sum() > 0 and prompt_only[0, 3:].abs().sum() == 0
    assert generated_only[0, :3].abs().sum() == 0 and generated_only[0, 3:].abs().sum() > 0


def test_special_positions_are_never_edited_unless_asked(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    eos = tiny_model.tokenizer.eos_token_id
    tokens = torch.cat([tokens, torch.tensor([[eos]]), tokens[:, 1:4]], dim=1)  # BOS at 0, an EOS inside
    special = Span.of(tiny_model, tokens).special[0]
    assert special.nonzero().flatten().tolist() == [0, tokens.shape[1] - 4]
    plain = hook_acts(tiny_model, tokens)
    codes = sae.encode(plain)  # [pos, d_sae]
    latent = int((codes[0] * (codes[1:6] > 0).any(0)).argmax())  # largest at BOS among those active in the prompt
    assert codes[0, latent] > 0
    prototype = prototype_code(tiny_model, sae, HOOK, CONCEPT)
    edits = {"additive": lambda **kw: additive(decoder_direction(sae, 3), 5.0, **kw),
             "clamp": lambda **kw: clamp(sae, 3, 4.0, **kw),
             "ablate": lambda **kw: ablate(sae, latent, **kw),
             "gradient_descent": lambda **kw: gradient_descent(sae, prototype, steps=5, lr=0.5, **kw)}
    for name, make in edits.items():
        for positions in ("all", "prompt"):
            edited = hook_acts(tiny_model, tokens, make(positions=positions), prompt_len=6)
            assert torch.equal(edited[special], plain[special]), (name, positions)
            assert not torch.equal(edited[~special], plain[~special]), (name, positions)
        asked = hook_acts(tiny_model, tokens, make(positions="all", include_special=True))
        assert not torch.equal(asked[special], plain[special]), name
    # ablation at every position but the specials = the same ablation applied by hand to rows 1.. only
    manual = plain.clone()
    rows = ~special
    manual[rows] = ablate(sae, latent)(plain[None, rows], plain_span(int(rows.sum()), 99))[0]
    torch.testing.assert_close(hook_acts(tiny_model, tokens, ablate(sae, latent)), manual)


def test_hooks_are_removed_after_use_and_after_an_exception(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    plain = logits_with(tiny_model, tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny_model, HOOK, additive(decoder_direction(sae, 3), 10.0), Span.of(tiny_model, tokens)):
            raise RuntimeError("boom")
    assert torch.equal(logits_with(tiny_model, tokens), plain)
    generate(tiny_model, HOOK, tokens, additive(decoder_direction(sae, 3), 10.0), max_new_tokens=3)
    assert torch.equal(logits_with(tiny_model, tokens), plain)


def test_gradient_descent_first_step_by_hand(sae):
    """Adam's first step moves every coordinate by lr against the sign of its gradient (m/sqrt(v) = g/|g|);
    then z >= 0 is enforced and h gets dec(z_1) - dec(z_0), the SAE error kept."""
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(1, 3, 64, generator=generator) * 0.3
    prototype = torch.rand(256, generator=generator) * (torch.rand(256, generator=generator) < 0.1)
    z0 = sae.encode(h[0])
    lr = z0[z0 > 0].median().item()  # large enough that some codes would go negative without the projection
    out = gradient_descent(sae, prototype, steps=1, lr=lr)(h, plain_span(3, 3))
    z1 = (z0 - lr * torch.sign(z0 - prototype)).clamp(min=0)  # J = ||z - p||^2, grad 2 (z - p)
    expected = h[0] + (z1 - z0) @ sae.W_dec / sae.input_scale
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-4)


def test_gradient_descent_reaches_the_prototype_and_is_a_no_op_without_steps(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    h = hook_acts(tiny_model, tokens)[None]
    span = Span.of(tiny_model, tokens)
    prototype = prototype_code(tiny_model, sae, HOOK, CONCEPT)
    assert prototype.shape == (256,) and prototype.ge(0).all() and prototype.gt(0).any()
    assert torch.equal(gradient_descent(sae, prototype, steps=0)(h, span), h)
    assert torch.equal(gradient_descent(sae, prototype, lr=0.0)(h, span), h)
    edit = gradient_descent(sae, prototype, steps=300, lr=0.05)
    out = edit(h, span)
    assert edit.losses[-1] < 0.01 * edit.losses[0]
    # the codes were replaced by (nearly) the prototype: h' = h + dec(p) - dec(enc(h)) away from BOS
    expected = h[0, 1:] + (prototype - sae.encode(h[0, 1:])) @ sae.W_dec / sae.input_scale
    assert (out[0, 1:] - expected).norm(dim=-1).max() < 0.05 * (expected - h[0, 1:]).norm(dim=-1).min()
    cosine = gradient_descent(sae, prototype, steps=50, lr=0.05, objective="cosine")
    cosine(h, span)
    assert cosine.losses[-1] < cosine.losses[0]
    with pytest.raises(SteeringError, match="prototype"):
        gradient_descent(sae, prototype[:10])


def test_dense_prototype_offset_lowers_its_objective(tiny_model, sae):
    result = dense_prototype_offset(tiny_model, sae, HOOK, PROMPT, CONCEPT, steps=30)
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
    assert zero["target_activation_in_text"] == zero["target_activation_at_hook"]
    rows = sweep(tiny_model, sae, HOOK, PROMPT, 3, [0.0, 2.0, 8.0], max_new_tokens=4, target_ids=target)
    assert [r["alpha"] for r in rows] == [0.0, 2.0, 8.0]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6) and rows[2]["kl"] > rows[1]["kl"] > 0
    assert rows[2]["target_activation_at_hook"] > rows[0]["target_activation_at_hook"]
    assert len(tradeoff_figure(rows).data) == 1


def reference_logprob_change(model, tokens, prompt_len, edit, target):
    """Teacher-forced log p(target) steered minus unsteered, averaged over the positions predicting generated tokens."""
    base = logits_with(model, tokens)[0].log_softmax(-1)
    steered = logits_with(model, tokens, edit, prompt_len)[0].log_softmax(-1)
    rows = range(prompt_len - 1, tokens.shape[1] - 1)
    return sum((steered[r, t] - base[r, t]).item() for r in rows for t in target) / (len(rows) * len(target))


def test_logprob_change_moves_with_kl_when_only_generated_positions_are_steered(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    n = tokens.shape[1]
    target = tiny_model.tokenizer(" the", add_special_tokens=False)["input_ids"]
    for alpha in (0.0, 3.0, 12.0):
        edit = additive(decoder_direction(sae, 3), alpha, "generated")
        out = generate(tiny_model, HOOK, tokens, edit, max_new_tokens=5)
        metrics = score(tiny_model, sae, HOOK, out, n, edit, 3, target)
        assert metrics["target_logprob_change"] == pytest.approx(
            reference_logprob_change(tiny_model, out, n, edit, target), abs=1e-5)
        if alpha == 0:
            assert metrics["kl"] == pytest.approx(0, abs=1e-6) and metrics["target_logprob_change"] == 0
        else:
            assert metrics["kl"] > 1e-3 and abs(metrics["target_logprob_change"]) > 1e-3


def test_concept_in_text_is_read_without_the_edit(tiny_model, sae):
    """On one token sequence the at-hook code follows the edit's strength, the in-text code does not."""
    tokens = prompt_tokens(tiny_model, PROMPT)
    n = tokens.shape[1]
    out = generate(tiny_model, HOOK, tokens, additive(decoder_direction(sae, 3), 8.0), max_new_tokens=5)
    by_alpha = [score(tiny_model, sae, HOOK, out, n, additive(decoder_direction(sae, 3), a), 3) for a in (0, 4, 8)]
    assert by_alpha[0]["target_activation_at_hook"] < by_alpha[2]["target_activation_at_hook"]
    assert len({m["target_activation_in_text"] for m in by_alpha}) == 1
    expected = sae.encode(hook_acts(tiny_model, out)[n:])[:, 3].mean().item()  # the unsteered model reads the text
    assert by_alpha[2]["target_activation_in_text"] == pytest.approx(expected, abs=1e-6)


def test_bad_input_is_explained(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    with pytest.raises(SteeringError, match="out of range"):
        decoder_direction(sae, 256)
    with pytest.raises(SteeringError, match="finite"):
        additive(decoder_direction(sae, 1), float("inf"))
    with pytest.raises(SteeringError, match="no hook"):
        with steering(tiny_model, "blocks.9.hook_resid_post", None, Span.of(tiny_model, tokens)):
            pass
    with pytest.raises(SteeringError, match="empty"):
        prompt_tokens(tiny_model, "   ")
    with pytest.raises(SteeringError, match="context of 512"):
        generate(tiny_model, HOOK, tokens, None, max_new_tokens=600)
    with pytest.raises(SteeringError, match="not a signed SAE"):
        signed_steer(sae, 1, 2.0)
    with pytest.raises(SteeringError, match="non-negative"):
        clamp(sae, 1, -1.0)(torch.zeros(1, 1, 64), plain_span(1, 1))
    with pytest.raises(SteeringError, match="span covers"):
        additive(decoder_direction(sae, 1), 1.0)(torch.zeros(1, 3, 64), plain_span(2, 1))


def test_signed_sae_steers_both_ways_and_lens_finds_latents(tiny_model):
    from analysis.steering_metrics import logit_lens_latents

    signed = build_sae("abstopk", d_in=64, d_sae=128, k=4, selection="per_token")
    h = torch.randn(1, 2, 64)
    minus = signed_steer(signed, 5, -2.0)(h, plain_span(2, 2))
    torch.testing.assert_close(minus, h - 2.0 * decoder_direction(signed, 5))
    clamp(signed, 5, -1.0)(h, plain_span(2, 2))  # negative clamps are fine for signed codes
    found = logit_lens_latents(tiny_model, signed, " the", n=3)
    scores = [s for _, s in found]
    assert len(found) == 3 and scores == sorted(scores, reverse=True)


def test_a_sweep_generated_as_one_batch_equals_each_generation_alone(tiny_model, sae):
    tokens = prompt_tokens(tiny_model, PROMPT)
    edits = [None, additive(decoder_direction(sae, 3), 12.0), clamp(sae, 5, 9.0, "generated"), ablate(sae, 3)]
    together = generate(tiny_model, HOOK, tokens.repeat(len(edits), 1), per_row(edits), max_new_tokens=6)
    alone = torch.cat([generate(tiny_model, HOOK, tokens, edit, max_new_tokens=6) for edit in edits])
    assert torch.equal(together, alone)
    assert len({tuple(row.tolist()) for row in alone}) >= 3  # the rows differ, so the batch kept them apart
    with pytest.raises(SteeringError, match="repeat the prompt once per edit"):
        generate(tiny_model, HOOK, tokens, per_row(edits), max_new_tokens=2)
