"""OpenAI sparse_autoencoder .pt files load with the codes and reconstructions of model.py's Autoencoder
(per-token LN, TopK then ReLU, un-normalised output), computed here in plain torch from the raw state dict; the
release path states hook, model and L0; unsafe or broken files and a missing k are refused with one sentence."""
import pytest
import torch

from saes import load_sae
from saes.formats import LayoutError, detect_layout

D_IN, D_SAE, K = 16, 64, 8
RELEASE = "gpt2-small/resid_post_mlp_v5_32k/autoencoders/6.pt"


def state_of(seed: int = 0, activation: str | None = "TopK", k: int = K, d_in: int = D_IN, d_sae: int = D_SAE):
    """Autoencoder.state_dict() of model.py: tensors, the activation's name and its state dict."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "pre_bias": 0.3 * torch.randn(d_in, generator=g),
        "encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
        "latent_bias": 0.2 * torch.randn(d_sae, generator=g),
        "decoder.weight": torch.randn(d_in, d_sae, generator=g) / d_sae ** 0.5 * 2,
        "stats_last_nonzero": torch.zeros(d_sae, dtype=torch.long),
        "latents_activation_frequency": torch.ones(d_sae),
        "latents_mean_square": torch.zeros(d_sae),
    }
    if activation == "TopK":
        state.update(activation="TopK", activation_state_dict={"k": k, "postact_fn": "ReLU"})
    elif activation is not None:
        state["activation"] = activation
    return state


def reference(state: dict, x: torch.Tensor, k: int | None = K, normalize: bool = True):
    """model.py's LN / encode / decode (TopK: topk of the pre-activations, ReLU on the kept values), float64."""
    s = {n: v.double() for n, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    x = x.double()
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = torch.nn.functional.linear(x - s["pre_bias"], s["encoder.weight"], s["latent_bias"])
    if k is None:
        codes = torch.relu(pre)
    else:
        top = torch.topk(pre, k=k, dim=-1)
        codes = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    recon = torch.nn.functional.linear(codes, s["decoder.weight"]) + s["pre_bias"]
    return codes, recon * std + mu if normalize else recon


def write(root, rel: str = RELEASE, state=None, **kwargs):
    file = root / rel
    file.parent.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else state_of(**kwargs)
    torch.save(state, file)
    return file, state


def inputs(seed: int = 3, n: int = 200, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + offset


def assert_matches(sae, state, x, atol=1e-5, **ref):
    ref_codes, ref_recon = reference(state, x, **ref)
    codes = sae.encode(x)
    torch.testing.assert_close(codes.double(), ref_codes, atol=atol, rtol=0)
    torch.testing.assert_close(sae.decode(codes).double(), ref_recon, atol=atol, rtol=0)


def test_topk_release_file_matches_model_py(tmp_path):
    file, state = write(tmp_path)
    assert detect_layout(file) == "openai"
    sae = load_sae(file)
    assert sae.architecture == "topk" and sae.cfg.k == K and sae.cfg.token_norm == "layer_norm"
    assert_matches(sae, state, inputs())
    source = sae.cfg.metadata["source"]
    assert (source["layout"], source["hook"], source["model"], source["l0"]) == \
        ("openai", "blocks.6.hook_resid_post", "gpt2", float(K))


def test_layer_norm_with_a_large_mean_offset(tmp_path):
    """The LN must be model.py's: mean removed, unbiased std, eps added to the std, output * std + mean."""
    file, state = write(tmp_path)
    x = inputs(offset=50.0, scale=3.0)
    assert_matches(load_sae(file, dtype="float64"), state, x)
    assert_matches(load_sae(file, dtype="float64"), state, inputs(4, offset=5.0, scale=0.003))  # eps matters
    ref_codes, ref_recon = reference(state, x)
    sae = load_sae(file)  # float32: codes agree; the reconstruction carries the 50 offset, so relative tolerance
    torch.testing.assert_close(sae.encode(x).double(), ref_codes, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.reconstruct(x).double(), ref_recon, atol=1e-4, rtol=1e-6)


def test_relu_autoencoder_has_no_layer_norm(tmp_path):
    file, state = write(tmp_path, "resid_delta_mlp_v4/autoencoders/2.pt", activation="ReLU")
    sae = load_sae(file)
    assert sae.architecture == "relu_l1" and sae.cfg.token_norm == "none"
    assert_matches(sae, state, inputs(), k=None, normalize=False)
    source = sae.cfg.metadata["source"]
    assert (source["hook"], source["model"], source["l0"]) == ("blocks.2.hook_mlp_out", None, None)


def test_k_from_the_option_or_the_file_name(tmp_path):
    file, state = write(tmp_path, "mine/sae.pt", activation=None)
    with pytest.raises(LayoutError, match="does not state its activation or k: pass k=K"):
        load_sae(file)
    sae = load_sae(file, k=5)
    assert sae.cfg.k == 5 and sae.cfg.metadata["source"]["hook"] is None
    assert_matches(sae, state, inputs(), k=5)
    file, state = write(tmp_path, "mine/resid_k12.pt", activation=None)
    assert load_sae(file).cfg.k == 12
    file, _ = write(tmp_path, "mine/stated.pt")
    with pytest.raises(LayoutError, match="states k=8 but k=4 was passed"):
        load_sae(file, k=4)


@pytest.mark.parametrize("location, hook", [
    ("mlp_post_act", "blocks.1.mlp.hook_post"), ("resid_delta_attn_v5_32k", "blocks.1.hook_attn_out"),
    ("resid_post_attn_v5_128k", "blocks.1.hook_resid_mid"), ("resid_delta_mlp_v5_32k", "blocks.1.hook_mlp_out"),
])
def test_release_locations_map_to_hooks(tmp_path, location, hook):
    file, _ = write(tmp_path, f"gpt2-small/{location}/autoencoders/1.pt")
    assert load_sae(file).cfg.metadata["source"]["hook"] == hook


def test_square_autoencoder_uses_the_names(tmp_path):
    """d_in == d_sae: nn.Linear orientation of encoder.weight / decoder.weight, nothing guessed from shapes."""
    file, state = write(tmp_path, "square/0.pt", k=4, d_sae=D_IN)
    sae = load_sae(file)
    assert sae.cfg.d_sae == D_IN
    assert_matches(sae, state, inputs(), k=4)


class NotATensor:
    """Pickled into the .pt: weights_only loading must refuse it."""

    def __init__(self):
        self.payload = "code"


def test_bad_files_give_one_sentence(tmp_path):
    file, _ = write(tmp_path, "bad/pickled.pt", state={**state_of(), "evil": NotATensor()})
    with pytest.raises(LayoutError, match="pickled.pt holds pickled objects other than tensors.*refusing"):
        load_sae(file)

    file, _ = write(tmp_path, "bad/truncated.pt")
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(LayoutError, match="truncated.pt is not a readable torch file.*download or copy it again"):
        load_sae(file)

    state = state_of()
    state["decoder.weight"] = state["decoder.weight"].T.contiguous()  # [d_sae, d_in]: transposed
    file, _ = write(tmp_path, "bad/wrong_shape.pt", state=state)
    with pytest.raises(LayoutError, match=r"tensor 'decoder.weight' has shape \(64, 16\), expected \(16, 64\)"):
        load_sae(file)

    state = state_of()
    state["activation_state_dict"] = {"k": K, "postact_fn": "Identity"}
    file, _ = write(tmp_path, "bad/identity.pt", state=state)
    with pytest.raises(LayoutError, match="postact_fn 'Identity'"):
        load_sae(file)

    file, _ = write(tmp_path, "bad/scale.pt")
    with pytest.raises(LayoutError, match="input_scale does not apply"):
        load_sae(file, input_scale=2.0)


def test_dictionary_learning_ae_pt_is_not_taken_for_openai(tmp_path):
    file, _ = write(tmp_path, "dl/ae.pt")
    (file.parent / "config.json").write_text("{}")
    from saes.formats import openai
    assert not openai.detect(file) and openai.detect(write(tmp_path, "other/ae.pt")[0])
