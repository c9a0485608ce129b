"""The logit lens goes through the final norm's weight γ (issue 13): checked on the tiny model with a random,
non-uniform γ against a lens computed here from the raw safetensors weights, in all three places that use it."""
import pytest
import torch
from safetensors.torch import load_file

from saes import build_sae

GAMMA_SEED = 7


@pytest.fixture(scope="module")
def model():
    """A private tiny model (the session one stays untouched) whose final RMSNorm weight is random and signed."""
    from training.model import load_model

    model = load_model("tiny")
    generator = torch.Generator().manual_seed(GAMMA_SEED)
    with torch.no_grad():
        model.ln_final.weight.copy_(1.5 + torch.randn(64, generator=generator))  # mean 1.5, some negative
    return model


@pytest.fixture(scope="module")
def raw(model):
    """γ and the unembedding read back from the weights themselves: [64] and [vocab, 64] (tied to the embedding)."""
    from training.model import tiny_dir

    weights = load_file(str(tiny_dir() / "model.safetensors"))
    generator = torch.Generator().manual_seed(GAMMA_SEED)
    gamma = 1.5 + torch.randn(64, generator=generator)
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))  # the file's γ is uniform; ours is not
    return gamma, weights["model.embed_tokens.weight"]


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build_sae("topk", d_in=64, d_sae=96, k=4, input_scale=4.0).requires_grad_(False)


def reference_lens(raw, directions):
    gamma, embed = raw
    return (directions * gamma) @ embed.T  # [n, vocab]; Llama has no unembedding bias


def test_direct_logits_match_raw_weights_and_the_models_own_final_norm(model, raw):
    from training.model import direct_logits

    d = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    expected = reference_lens(raw, d)
    torch.testing.assert_close(direct_logits(model, d), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct_logits(model, d, token_ids=[5, 900]), expected[:, [5, 900]])
    # the model's own ln_final + unembed on d alone: the same up to the positive factor 1/rms(d) per row
    rms = (d.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    with torch.no_grad():
        through_model = model.unembed(model.ln_final(d[None]))[0]
    torch.testing.assert_close(direct_logits(model, d) / rms, through_model, atol=1e-5, rtol=1e-5)
    # with this γ the lens differs from the γ-free one, so the tests below can tell them apart
    assert not torch.equal((d @ raw[1].T).argmax(-1), expected.argmax(-1))


def test_feature_store_lens_top_and_bottom_tokens(model, raw, sae):
    from analysis.features import logit_lens

    directions = sae.W_dec / sae.input_scale
    lens = logit_lens(model, directions, k=5, chunk=40)  # several chunks
    expected = reference_lens(raw, directions)  # [96, vocab]
    top_v, top_i = expected.topk(5, dim=1)
    bottom_v, bottom_i = (-expected).topk(5, dim=1)
    assert torch.equal(lens["lens_top_ids"].long(), top_i)
    assert torch.equal(lens["lens_bottom_ids"].long(), bottom_i)
    torch.testing.assert_close(lens["lens_top_values"], top_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens["lens_bottom_values"], -bottom_v, atol=1e-5, rtol=1e-5)
    # bottom tokens are the most negative ones: none of them is a top token
    assert (lens["lens_bottom_values"].max(1).values < lens["lens_top_values"].min(1).values).all()


def test_circuit_node_labels_use_the_lens(model, raw, sae):
    from analysis.circuit_graph import logit_lens_labels

    latents = [3, 17, 50]
    labels = logit_lens_labels(model, sae, latents, n_tokens=3)
    top = reference_lens(raw, sae.W_dec[latents] / sae.input_scale).topk(3, dim=1).indices
    for latent, row in zip(latents, top.tolist()):
        words = [model.tokenizer.decode([t]).strip() or repr(model.tokenizer.decode([t])) for t in row]
        assert labels[latent] == f"#{latent}: " + "|".join(words)


def test_steering_search_ranks_latents_by_the_lens(model, raw, sae):
    from analysis.steering_metrics import logit_lens_latents

    token = " the"
    (token_id,) = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    column = reference_lens(raw, sae.W_dec / sae.input_scale)[:, token_id]  # [d_sae]
    found = logit_lens_latents(model, sae, token, n=4)
    values, ids = column.topk(4)
    assert [i for i, _ in found] == ids.tolist()
    torch.testing.assert_close(torch.tensor([s for _, s in found]), values, atol=1e-5, rtol=1e-5)
