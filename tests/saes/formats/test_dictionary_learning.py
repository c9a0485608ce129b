"""dictionary_learning trainer folders (ae.pt + config.json) of every dictionary class load with the codes and
reconstructions of the reference's encode/decode (dictionary.py, trainers/*.py), computed here in plain torch from
the raw state dict; config.json states hook, model and L0; unsafe or broken files are refused with one sentence."""
import json

import pytest
import torch

from saes import load_sae
from saes.formats import LayoutError, detect_layout

D_IN, D_SAE, K = 16, 64, 6
relu = torch.relu


def rand(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


def state_of(dict_class: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict exactly as the class's state_dict() names and orients its tensors, with non-trivial biases."""
    g = torch.Generator().manual_seed(seed)
    enc = rand(g, D_SAE, D_IN, scale=D_IN ** -0.5)  # nn.Linear(d_in, d_sae).weight
    dec = rand(g, D_IN, D_SAE, scale=D_SAE ** -0.5 * 2)  # nn.Linear(d_sae, d_in).weight, columns not unit norm
    if dict_class == "AutoEncoder":
        return {"bias": rand(g, D_IN, scale=0.5), "encoder.weight": enc, "encoder.bias": rand(g, D_SAE, scale=0.2),
                "decoder.weight": dec}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": rand(g, D_SAE, scale=0.2), "decoder.weight": dec,
                "decoder.bias": rand(g, D_IN, scale=0.5)}
    if dict_class == "GatedAutoEncoder":
        return {"decoder_bias": rand(g, D_IN, scale=0.5), "encoder.weight": enc, "r_mag": rand(g, D_SAE, scale=0.3),
                "gate_bias": rand(g, D_SAE, scale=0.2), "mag_bias": rand(g, D_SAE, scale=0.2), "decoder.weight": dec}
    if dict_class == "JumpReluAutoEncoder":
        threshold = 0.1 + 0.3 * torch.rand(D_SAE, generator=g)
        threshold[:8] = -0.2  # relu(u * [u > θ]) with θ < 0
        return {"W_enc": enc.T.contiguous(), "b_enc": rand(g, D_SAE, scale=0.2), "W_dec": dec.T.contiguous(),
                "b_dec": rand(g, D_IN, scale=0.5), "threshold": threshold}
    topk = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.25)}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {**topk, "group_sizes": torch.tensor([8, 24, 32]), "W_enc": enc.T.contiguous(),
                "b_enc": rand(g, D_SAE, scale=0.2), "W_dec": dec.T.contiguous(), "b_dec": rand(g, D_IN, scale=0.5)}
    return {**topk, "decoder.weight": dec, "encoder.weight": enc, "encoder.bias": rand(g, D_SAE, scale=0.2),
            "b_dec": rand(g, D_IN, scale=0.5)}


def reference(dict_class: str, s: dict, x: torch.Tensor, use_threshold: bool | None = None):
    """dictionary.py / trainers' encode and decode on the raw tensors (float64). Returns (codes, recon)."""
    s = {k: v.double() if v.is_floating_point() else v for k, v in s.items()}
    x = x.double()
    linear = torch.nn.functional.linear
    if dict_class == "AutoEncoder":
        f = relu(linear(x - s["bias"], s["encoder.weight"], s["encoder.bias"]))
        return f, linear(f, s["decoder.weight"]) + s["bias"]
    if dict_class == "AutoEncoderNew":
        f = relu(linear(x, s["encoder.weight"], s["encoder.bias"]))
        return f, linear(f, s["decoder.weight"], s["decoder.bias"])
    if dict_class == "GatedAutoEncoder":
        x_enc = linear(x - s["decoder_bias"], s["encoder.weight"])
        f = ((x_enc + s["gate_bias"]) > 0).double() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, linear(f, s["decoder.weight"]) + s["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    post = relu(linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
    thresholded = use_threshold if use_threshold is not None else dict_class == "BatchTopKSAE"
    if thresholded:
        f = post * (post > s["threshold"])
    else:
        top = post.topk(int(s["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    return f, linear(f, s["decoder.weight"]) + s["b_dec"]


def write(root, dict_class: str, name: str = "trainer_0", state=None, seed: int = 0, **trainer):
    folder = root / name
    folder.mkdir(parents=True)
    state = state if state is not None else state_of(dict_class, seed)
    torch.save(state, folder / "ae.pt")
    config = {"trainer": {"dict_class": "AutoEncoder" if dict_class == "AutoEncoderNew" else dict_class,
                          "activation_dim": D_IN, "dict_size": D_SAE, "layer": 3,
                          "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3",
                          **({"k": K} if "TopK" in dict_class else {}), **trainer},
              "buffer": {"ctx_len": 128}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, state


def inputs(seed: int = 3, n: int = 200) -> torch.Tensor:
    return 2.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_matches(sae, dict_class, state, x, atol=1e-5, **ref):
    ref_codes, ref_recon = reference(dict_class, state, x, **ref)
    fraction = (ref_codes > 0).float().mean().item()
    assert 0.03 < fraction < 0.8, f"test data leaves {fraction:.0%} of latents active"
    codes = sae.encode(x)
    torch.testing.assert_close(codes.double(), ref_codes, atol=atol, rtol=0)
    torch.testing.assert_close(sae.decode(codes).double(), ref_recon, atol=atol, rtol=0)


@pytest.mark.parametrize("dict_class, ours", [
    ("AutoEncoder", "relu_l1"), ("AutoEncoderNew", "relu_l1"), ("GatedAutoEncoder", "gated"),
    ("JumpReluAutoEncoder", "jumprelu"), ("AutoEncoderTopK", "topk"), ("BatchTopKSAE", "batchtopk"),
    ("MatryoshkaBatchTopKSAE", "batchtopk"),
])
def test_every_dictionary_class_matches_the_reference(tmp_path, dict_class, ours):
    folder, state = write(tmp_path, dict_class, seed=sum(map(ord, dict_class)))
    assert detect_layout(folder) == "dictionary_learning"
    sae = load_sae(folder)
    assert sae.architecture == ours and (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert_matches(sae, dict_class, state, inputs())
    source = sae.cfg.metadata["source"]
    assert (source["layout"], source["hook"], source["model"], source["dict_class"]) == \
        ("dictionary_learning", "blocks.3.hook_resid_post", "EleutherAI/pythia-70m-deduped", dict_class)
    assert source["l0"] == (float(K) if "TopK" in dict_class else None)
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert source["group_sizes"] == [8, 24, 32]
    assert_matches(load_sae(folder / "ae.pt"), dict_class, state, inputs(4))  # the ae.pt itself also loads


def test_topk_with_its_threshold_and_unit_decoder_options(tmp_path):
    folder, state = write(tmp_path, "AutoEncoderTopK")
    sae = load_sae(folder, use_threshold=True)
    assert sae.architecture == "batchtopk" and float(sae.threshold) == pytest.approx(0.25)
    assert_matches(sae, "AutoEncoderTopK", state, inputs(), use_threshold=True)

    folder, state = write(tmp_path, "AutoEncoder", name="standard")
    raw, unit = load_sae(folder), load_sae(folder, normalize_decoder=True)
    norms = state["decoder.weight"].norm(dim=0).double()  # AutoEncoder.normalize_decoder: codes * ||d_i||
    x = inputs()
    torch.testing.assert_close(unit.encode(x).double(), raw.encode(x).double() * norms, atol=1e-5, rtol=0)
    torch.testing.assert_close(unit.reconstruct(x), raw.reconstruct(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(unit.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-6, rtol=0)


def test_uncalibrated_batchtopk_threshold_refuses_to_encode(tmp_path):
    state = state_of("BatchTopKSAE")
    state["threshold"] = torch.tensor(-1.0)  # the initial value: never tracked during training
    folder, _ = write(tmp_path, "BatchTopKSAE", state=state)
    sae = load_sae(folder)
    assert sae.cfg.metadata["source"]["threshold_calibrated"] is False
    with pytest.raises(ValueError, match="no calibrated inference threshold"):
        sae.encode(inputs())


def test_stated_hooks(tmp_path):
    folder, _ = write(tmp_path, "AutoEncoder", name="mlp", submodule_name="mlp_out_layer_2")
    assert load_sae(folder).cfg.metadata["source"]["hook"] == "blocks.2.hook_mlp_out"
    folder, _ = write(tmp_path / "pythia-70m-deduped" / "attn_out_layer4", "AutoEncoder", name="10_32768",
                      submodule_name=None, layer=None)
    assert load_sae(folder).cfg.metadata["source"]["hook"] == "blocks.4.hook_attn_out"
    folder, _ = write(tmp_path / "embed", "AutoEncoder", name="10_32768", submodule_name=None, layer=None)
    assert load_sae(folder).cfg.metadata["source"]["hook"] == "hook_embed"
    folder, _ = write(tmp_path, "AutoEncoder", name="layer_only", submodule_name=None, layer=7)
    assert load_sae(folder).cfg.metadata["source"]["hook"] == "blocks.7.hook_resid_post"


class NotATensor:
    """Pickled into ae.pt: weights_only loading must refuse it."""

    def __init__(self):
        self.payload = "code"


def test_bad_files_give_one_sentence(tmp_path):
    state = state_of("AutoEncoder")
    folder, _ = write(tmp_path, "AutoEncoder", name="pickled", state={**state, "extra": NotATensor()})
    with pytest.raises(LayoutError, match="ae.pt holds pickled objects other than tensors.*refusing"):
        load_sae(folder)

    folder, _ = write(tmp_path, "AutoEncoder", name="truncated")
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayoutError, match="ae.pt is not a readable torch file.*download or copy it again"):
        load_sae(folder)

    bad = {**state, "decoder.weight": state["decoder.weight"].T.contiguous()}
    folder, _ = write(tmp_path, "AutoEncoder", name="wrong_shape", state=bad)
    with pytest.raises(LayoutError, match=r"tensor 'decoder.weight' has shape \(64, 16\), expected \(16, 64\)"):
        load_sae(folder)

    folder, _ = write(tmp_path, "BatchTopKSAE", name="k_mismatch", k=K + 1)
    with pytest.raises(LayoutError, match="k buffer says 6 but config.json trainer.k says 7"):
        load_sae(folder)

    folder, _ = write(tmp_path, "AutoEncoder", name="unknown")
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["dict_class"] = "CrossCoder"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutError, match="dict_class 'CrossCoder' is not supported"):
        load_sae(folder)

    folder, _ = write(tmp_path, "AutoEncoder", name="scale")
    with pytest.raises(LayoutError, match="input_scale does not apply"):
        load_sae(folder, input_scale=2.0)


def test_square_dictionary_uses_the_names(tmp_path):
    """activation_dim == dict_size: the nn.Linear orientation of each name is applied, nothing is guessed."""
    g = torch.Generator().manual_seed(9)
    state = {"bias": rand(g, D_IN, scale=0.5), "encoder.weight": rand(g, D_IN, D_IN, scale=D_IN ** -0.5),
             "encoder.bias": rand(g, D_IN, scale=0.2), "decoder.weight": rand(g, D_IN, D_IN, scale=0.3)}
    folder, _ = write(tmp_path, "AutoEncoder", state=state, dict_size=D_IN)
    sae = load_sae(folder)
    assert sae.cfg.d_sae == D_IN
    assert_matches(sae, "AutoEncoder", state, inputs())
