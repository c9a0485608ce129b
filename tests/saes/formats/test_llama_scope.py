"""Llama Scope (lm_saes) folders load with lm_saes's inference codes and reconstructions, computed here in plain
torch from the raw file tensors following lm_saes's own loading path (SparseAutoEncoder.from_config at the release
commit: dataset-wise scale folded into the biases, unit-norm decoder columns, then the scalar JumpReLU threshold);
the hyperparams state hook, model and L0; settings that cannot load exactly are refused by key."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from saes import load_sae
from saes.formats import LayoutError, detect_layout

D, D_SAE = 16, 64
NORM_IN, NORM_OUT = 9.0, 2.5  # dataset average norms: s_in = 4/9, s_out = 1.6


def hyperparams(**overrides) -> dict:
    hp = {"d_model": D, "d_sae": D_SAE, "expansion_factor": 4, "hook_point_in": "blocks.15.hook_resid_post",
          "hook_point_out": "blocks.15.hook_resid_post", "use_decoder_bias": True,
          "apply_decoder_bias_to_pre_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": 0.35,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_IN},
          "sparsity_include_decoder_norm": True, "top_k": 50, "use_glu_encoder": False}
    hp.update(overrides)
    return hp


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """nn.Linear-oriented lm_saes tensors; decoder columns of norms 0.5..2 (released ones are not unit norm)."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(D, D_SAE, generator=g)
    decoder = decoder / decoder.norm(dim=0) * (0.5 + 1.5 * torch.rand(D_SAE, generator=g))
    return {"encoder.weight": torch.randn(D_SAE, D, generator=g) / D ** 0.5,
            "encoder.bias": 0.3 * torch.randn(D_SAE, generator=g),
            "decoder.weight": decoder,
            "decoder.bias": 0.4 * torch.randn(D, generator=g)}


def write(root, name: str = "Llama3_1-8B-Base-L15R-8x", hp: dict | None = None, seed: int = 0, weights=None):
    folder = root / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp if hp is not None else hyperparams()))
    weights = weights if weights is not None else random_weights(seed)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "checkpoints" / "final.safetensors"))
    return folder, weights


def reference(hp: dict, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_saes inference: from_config's standardisation and unit-decoder transform, then encode/decode."""
    E, b_E = w["encoder.weight"].double(), w["encoder.bias"].double()
    D_w, b_D = w["decoder.weight"].double(), w["decoder.bias"].double()
    x = x.double()
    factor = None
    if hp["norm_activation"] == "dataset-wise":  # standardize_parameters_of_dataset_activation_scaling
        s_in = math.sqrt(D) / hp["dataset_average_activation_norm"]["in"]
        s_out = math.sqrt(D) / hp["dataset_average_activation_norm"]["out"]
        b_E, b_D, D_w = b_E / s_in, b_D / s_out, D_w * s_in / s_out
    elif hp["norm_activation"] == "token-wise":
        factor = math.sqrt(D) / x.norm(dim=-1, keepdim=True)
        x = x * factor
    if hp["sparsity_include_decoder_norm"]:  # transform_to_unit_decoder_norm
        n = torch.norm(D_w, p=2, dim=0)
        D_w, E, b_E = D_w / n, E * n[:, None], b_E * n
    if hp["apply_decoder_bias_to_pre_encoder"]:
        x = x - b_D
    hidden = torch.nn.functional.linear(x, E, b_E)
    if hp["act_fn"] == "jumprelu" or hp["jump_relu_threshold"] > 0:
        codes = hidden.where(hidden > hp["jump_relu_threshold"], 0)
    elif hp["act_fn"] == "topk":
        acts = hidden.clamp(min=0)
        top = acts.topk(hp["top_k"], dim=-1)
        codes = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    else:
        codes = hidden.clamp(min=0)
    recon = torch.nn.functional.linear(codes, D_w, b_D)
    return codes, recon if factor is None else recon / factor


def inputs(seed: int = 7, n: int = 200, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(n, D, generator=g) + offset


def assert_matches(sae, hp, w, x, atol=1e-5, active=(0.03, 0.8)):
    ref_codes, ref_recon = reference(hp, w, x)
    fraction = (ref_codes != 0).float().mean().item()
    assert active[0] < fraction < active[1], f"test data leaves {fraction:.0%} of latents active"
    codes = sae.encode(x)
    torch.testing.assert_close(codes.double(), ref_codes, atol=atol, rtol=0)
    torch.testing.assert_close(sae.decode(codes).double(), ref_recon, atol=atol, rtol=0)


def test_jumprelu_dataset_wise_matches_lm_saes_inference(tmp_path):
    folder, w = write(tmp_path)
    assert detect_layout(folder) == "llama_scope"
    sae = load_sae(folder)
    assert sae.architecture == "jumprelu" and sae.cfg.input_scale == 1.0 and sae.cfg.token_norm == "none"
    assert_matches(sae, hyperparams(), w, inputs())
    source = sae.cfg.metadata["source"]
    assert (source["layout"], source["hook"], source["model"], source["l0"], source["transcoder"]) == \
        ("llama_scope", "blocks.15.hook_resid_post", "meta-llama/Llama-3.1-8B", None, False)
    assert source["jump_relu_threshold"] == 0.35 and source["train_top_k"] == 50


def test_reconstruction_equals_the_training_forward_when_the_gates_agree(tmp_path):
    """With act_fn relu the gate does not depend on units, so the folded SAE must reproduce lm_saes's training
    forward exactly: encoder(s_in x) then decoder(.) / s_out (compute_loss's de-normalised reconstruction)."""
    hp = hyperparams(act_fn="relu", jump_relu_threshold=0.0,
                     dataset_average_activation_norm={"in": NORM_IN, "out": NORM_OUT})
    folder, w = write(tmp_path, hp=hp)
    x = inputs()
    s_in, s_out = math.sqrt(D) / NORM_IN, math.sqrt(D) / NORM_OUT
    hidden = torch.nn.functional.linear(x.double() * s_in, w["encoder.weight"].double(), w["encoder.bias"].double())
    recon = torch.nn.functional.linear(hidden.relu(), w["decoder.weight"].double(), w["decoder.bias"].double()) / s_out
    sae = load_sae(folder, dtype="float64")
    assert sae.architecture == "relu_l1"
    torch.testing.assert_close(sae.reconstruct(x).double(), recon, atol=1e-9, rtol=0)
    assert_matches(sae, hp, w, x, active=(0.2, 0.8))


def test_in_and_out_norms_differ_and_b_dec_subtracted_when_configured(tmp_path):
    hp = hyperparams(dataset_average_activation_norm={"in": NORM_IN, "out": NORM_OUT},
                     apply_decoder_bias_to_pre_encoder=True, jump_relu_threshold=0.5)
    folder, w = write(tmp_path, hp=hp, seed=1)
    assert_matches(load_sae(folder), hp, w, inputs(8))


def test_topk_and_topk_converted_to_jumprelu(tmp_path):
    hp = hyperparams(act_fn="topk", jump_relu_threshold=0.0, top_k=8)
    folder, w = write(tmp_path, "topk", hp=hp, seed=2)
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg.k == 8 and sae.cfg.metadata["source"]["l0"] == 8.0
    assert_matches(sae, hp, w, inputs(9))
    hp = hyperparams(act_fn="topk", jump_relu_threshold=0.4, top_k=8)  # lm_saes: jumprelu for inference
    folder, w = write(tmp_path, "topk_thr", hp=hp, seed=3)
    sae = load_sae(folder)
    assert sae.architecture == "jumprelu" and sae.cfg.metadata["source"]["l0"] is None
    assert_matches(sae, hp, w, inputs(10))


def test_token_wise_normalisation_with_a_large_mean_offset(tmp_path):
    hp = hyperparams(norm_activation="token-wise", jump_relu_threshold=0.5)
    folder, w = write(tmp_path, hp=hp, seed=4)
    sae = load_sae(folder, dtype="float64")
    assert sae.cfg.token_norm == "constant_norm_rescale"
    assert_matches(sae, hp, w, inputs(11))
    assert_matches(sae, hp, w, inputs(12, offset=40.0))
    assert_matches(load_sae(folder), hp, w, inputs(13), atol=1e-5)  # float32


def test_defaults_hooks_and_transcoders(tmp_path):
    """Keys a hyperparams.json leaves out take lm_saes's defaults (apply_decoder_bias_to_pre_encoder true,
    sparsity_include_decoder_norm true); the hook falls back to the L{N}R|A|M folder name."""
    hp = {"d_model": D, "d_sae": D_SAE, "act_fn": "jumprelu", "jump_relu_threshold": 0.3,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_IN}}
    folder, w = write(tmp_path, "Llama3_1-8B-Base-L3M-32x", hp=hp, seed=5)
    sae = load_sae(folder)
    assert sae.cfg.metadata["source"]["hook"] == "blocks.3.hook_mlp_out"
    assert_matches(sae, {**hyperparams(), **hp, "apply_decoder_bias_to_pre_encoder": True}, w, inputs(14))
    hp = hyperparams(hook_point_in="blocks.4.ln2.hook_normalized", hook_point_out="blocks.4.hook_mlp_out",
                     dataset_average_activation_norm={"in": NORM_IN, "out": NORM_OUT})
    folder, w = write(tmp_path, "Llama3_1-8B-Base-L4TC-8x", hp=hp, seed=6)
    sae = load_sae(folder)
    source = sae.cfg.metadata["source"]
    assert (source["hook"], source["hook_out"], source["transcoder"]) == \
        ("blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out", True)
    assert_matches(sae, hp, w, inputs(15))


@pytest.mark.parametrize("overrides, match", [
    ({"norm_activation": "batch-wise"}, "norm_activation='batch-wise' is not supported"),
    ({"use_glu_encoder": True}, "use_glu_encoder=True is not supported"),
    ({"dataset_average_activation_norm": None}, "dataset_average_activation_norm=None is not supported"),
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
])
def test_settings_that_cannot_load_exactly_are_refused_by_key(tmp_path, overrides, match):
    folder, _ = write(tmp_path, hp=hyperparams(**overrides))
    with pytest.raises(LayoutError, match=match):
        load_sae(folder)


def test_bad_files_give_one_sentence(tmp_path):
    folder, _ = write(tmp_path, "truncated")
    file = folder / "checkpoints" / "final.safetensors"
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(LayoutError, match="final.safetensors is not a readable safetensors file"):
        load_sae(folder)

    w = random_weights(0)
    w["decoder.weight"] = w["decoder.weight"].T.contiguous()  # [d_sae, d_model]: transposed
    folder, _ = write(tmp_path, "wrong_shape", weights=w)
    with pytest.raises(LayoutError, match=r"tensor 'decoder.weight' has shape \(64, 16\), expected \(16, 64\)"):
        load_sae(folder)

    w = random_weights(0)
    w["decoder.weight"] = torch.randn(D + 4, D_SAE)
    folder, _ = write(tmp_path, "wider_out", weights=w)
    with pytest.raises(LayoutError, match="output width 20 differs from d_model=16"):
        load_sae(folder)

    folder, _ = write(tmp_path, "scale")
    with pytest.raises(LayoutError, match="input_scale does not apply"):
        load_sae(folder, input_scale=2.0)
