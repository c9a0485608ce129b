"""The SAELens layout loader (saes/formats/saelens.py) against a reference written here, in plain torch on the
file's tensors, from SAELens's own definitions (sae-lens 6.54: sae_lens/saes/sae.py `process_sae_in` and
`_setup_activation_normalization`, standard_sae.py, topk_sae.py `TopK`/`act_times_W_dec`, jumprelu_sae.py,
gated_sae.py, abstopk_sae.py, transcoder.py; sae_lens/loading/pretrained_sae_loaders.py `handle_pre_6_0_config`
and `read_sae_components_from_disk`; finetuning_scaling_factor from SAELens 5.9 sae.py `decode`). No SAELens
import: the real library is checked in tests/saes/test_saelens_compat.py.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import saes
from saes.formats import LayoutError, saelens

D_IN, D_SAE = 16, 64
V6 = {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12"}


# ---- folders ---------------------------------------------------------------------------------------------------
def weights(arch: str, seed: int = 0, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    """SAELens's state dict for `arch`: W_enc [d_in, d_sae], W_dec [d_sae, d_in] with rows of varied norm."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(D_IN, d_sae, generator=g) / D_IN**0.5,
        "W_dec": torch.randn(d_sae, D_IN, generator=g) * (0.2 + torch.rand(d_sae, 1, generator=g)),
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }
    bias = torch.randn(d_sae, generator=g) * 0.2
    if arch == "gated":
        t.update(b_gate=bias, r_mag=torch.randn(d_sae, generator=g) * 0.3, b_mag=torch.randn(d_sae, generator=g) * 0.2)
    else:
        t["b_enc"] = bias
    if arch in ("jumprelu", "jumprelu_transcoder"):
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    return t


def v6_cfg(arch: str, **fields) -> dict:
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": "transcoder" not in arch, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", **V6}}
    metadata = fields.pop("metadata", {})
    cfg.update(fields)
    cfg["metadata"].update(metadata)
    return cfg


def write(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


# ---- the reference -----------------------------------------------------------------------------------------------
def reference(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor, *, arch: str | None = None, k: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) of SAELens's encode then decode, in float64. `arch`/`k` override the cfg's (for
    pre-6 configs, whose conversion the caller states)."""
    t = {name: v.double() for name, v in t.items()}
    x = x.double()
    arch = arch or cfg["architecture"]
    k = k or cfg.get("k")
    transcoder = "transcoder" in arch
    norm = cfg.get("normalize_activations", "none")
    if norm == "layer_norm":  # run_time_activation_ln_in: std with Bessel's correction, eps added to the std
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        sae_in = (x - mu) / (std + 1e-5)
    elif norm == "constant_norm_rescale":
        coeff = math.sqrt(D_IN) / x.norm(dim=-1, keepdim=True)
        sae_in = x * coeff
    else:
        sae_in = x
    if not transcoder and cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - t["b_dec"]
    W_enc, W_dec = t["W_enc"], t["W_dec"]
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm"))
    if arch == "gated":
        gate = (sae_in @ W_enc + t["b_gate"]) > 0
        codes = gate * (sae_in @ (W_enc * t["r_mag"].exp()) + t["b_mag"]).relu()
    else:
        pre = sae_in @ W_enc + t["b_enc"]
        if arch in ("topk", "abstopk") and rescale:
            pre = pre * W_dec.norm(dim=-1)
        if arch == "topk":
            values, indices = pre.topk(k, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        elif arch == "abstopk":
            indices = pre.abs().topk(k, dim=-1, sorted=False).indices
            codes = torch.zeros_like(pre).scatter(-1, indices, pre.gather(-1, indices))
        elif arch in ("jumprelu", "jumprelu_transcoder"):
            codes = pre.relu() * (pre > t["threshold"])
        else:  # standard, transcoder
            codes = pre.relu()
    acts = codes
    if rescale:
        acts = acts / W_dec.norm(dim=-1)
    if cfg.get("finetuning_scaling_factor") and "scaling_factor" in t:
        acts = acts * t["scaling_factor"]
    out = acts @ W_dec + t["b_dec"]
    if not transcoder:  # a transcoder's output is not un-normalised
        if norm == "layer_norm":
            out = out * std + mu
        elif norm == "constant_norm_rescale":
            out = out / coeff
    return codes, out


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(48, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def check(sae, codes_ref, recon_ref, x):
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
    torch.testing.assert_close(codes.double(), codes_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon.double(), recon_ref, atol=1e-5, rtol=1e-5)


CASES = {
    "standard": ("standard", {}),
    "standard_no_b_dec_in": ("standard", {"apply_b_dec_to_input": False}),
    "topk": ("topk", {"k": 5}),
    "topk_rescaled": ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "topk_no_b_dec_in_rescaled": ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True,
                                            "apply_b_dec_to_input": False}),
    "jumprelu_b_dec_in": ("jumprelu", {"apply_b_dec_to_input": True}),
    "jumprelu_no_b_dec_in": ("jumprelu", {"apply_b_dec_to_input": False}),
    "gated": ("gated", {}),
    "gated_no_b_dec_in": ("gated", {"apply_b_dec_to_input": False}),
    "transcoder": ("transcoder", {"d_out": D_IN, "metadata": {"hook_name_out": "blocks.1.hook_mlp_out"}}),
    "jumprelu_transcoder": ("jumprelu_transcoder", {"d_out": D_IN,
                                                    "metadata": {"hook_name_out": "blocks.1.hook_mlp_out"}}),
    "abstopk": ("abstopk", {"k": 5}),
    "abstopk_rescaled": ("abstopk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "layer_norm": ("standard", {"normalize_activations": "layer_norm"}),
    "layer_norm_topk": ("topk", {"k": 5, "normalize_activations": "layer_norm"}),
    "constant_norm_rescale": ("topk", {"k": 5, "normalize_activations": "constant_norm_rescale"}),
    "constant_norm_rescale_jumprelu": ("jumprelu", {"normalize_activations": "constant_norm_rescale"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_v6_folders_equal_the_reference(tmp_path, name):
    arch, fields = CASES[name]
    cfg, t, x = v6_cfg(arch, **fields), weights(arch), inputs()
    sae = saes.load_sae(write(tmp_path / name, cfg, t))  # dispatched to the saelens layout
    check(sae, *reference(cfg, t, x), x)
    source = sae.cfg.metadata["source"]
    assert source["layout"] == "saelens" and source["hook"] == "blocks.1.hook_resid_post" and source["model"] == "tiny"
    if "transcoder" in arch:
        assert source["transcoder"] and source["hook_out"] == "blocks.1.hook_mlp_out"
    if "k" in fields:
        assert source["l0"] == fields["k"] and sae.cfg.k == fields["k"]


def test_square_sae_catches_a_wrong_orientation(tmp_path):
    """d_sae == d_in: a transposed W_enc or W_dec would still have the right shape."""
    for arch, fields in (("standard", {}), ("topk", {"k": 3})):
        cfg, t, x = v6_cfg(arch, d_sae=D_IN, **fields), weights(arch, d_sae=D_IN), inputs()
        check(saes.load_sae(write(tmp_path / arch, cfg, t)), *reference(cfg, t, x), x)


def pre_6_cfg(**fields) -> dict:
    """A SAELens 5 cfg.json: LLM fields at the top level, hook_point, activation_fn_str, no sae_lens_version."""
    cfg = {"model_name": "gpt2-small", "hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3,
           "hook_point_head_index": None, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "activation_fn_str": "relu", "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
           "context_size": 128, "normalize_activations": "none", "sae_lens_training_version": "3.13.0",
           "prepend_bos": True, "dataset_path": "Skylion007/openwebtext"}
    cfg.update(fields)
    return cfg


def test_pre_6_topk_config(tmp_path):
    """activation_fn_str topk + activation_fn_kwargs.k -> architecture topk with that k (handle_pre_6_0_config)."""
    cfg = pre_6_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 7})
    t, x = weights("topk"), inputs()
    sae = saes.load_sae(write(tmp_path / "old", cfg, t))
    assert sae.architecture == "topk" and sae.cfg.k == 7
    check(sae, *reference(cfg, t, x, arch="topk", k=7), x)
    source = sae.cfg.metadata["source"]
    assert source["hook"] == "blocks.3.hook_resid_pre" and source["model"] == "gpt2-small" and source["l0"] == 7


def test_pre_6_standard_with_defaults(tmp_path):
    """No architecture, no apply_b_dec_to_input, boolean normalize_activations False: standard, b_dec subtracted."""
    cfg = pre_6_cfg(normalize_activations=False)
    for key in ("apply_b_dec_to_input", "finetuning_scaling_factor"):
        cfg.pop(key)
    t, x = weights("standard"), inputs()
    sae = saes.load_sae(write(tmp_path / "old", cfg, t))
    assert sae.architecture == "relu_l1"
    check(sae, *reference({**cfg, "apply_b_dec_to_input": True}, t, x, arch="standard"), x)


def test_finetuning_scaling_factor(tmp_path):
    """SAELens 5: decode(z) = (z * scaling_factor) @ W_dec + b_dec when finetuning_scaling_factor is true."""
    g = torch.Generator().manual_seed(5)
    factor = 0.5 + torch.rand(D_SAE, generator=g)
    cfg = pre_6_cfg(finetuning_scaling_factor=True)
    t, x = {**weights("standard"), "scaling_factor": factor}, inputs()
    sae = saes.load_sae(write(tmp_path / "ft", cfg, t))
    codes_ref, recon_ref = reference(cfg, t, x, arch="standard")
    check(sae, codes_ref, recon_ref, x)
    plain = reference(cfg, weights("standard"), x, arch="standard")[1]
    assert (plain - recon_ref).abs().max() > 1e-2  # the factor matters
    # A unit scaling_factor is dropped (read_sae_components_from_disk), whatever the flag says.
    ones = saes.load_sae(write(tmp_path / "ones", pre_6_cfg(), {**weights("standard"),
                                                                 "scaling_factor": torch.ones(D_SAE)}))
    check(ones, *reference(pre_6_cfg(), weights("standard"), x, arch="standard"), x)
    # The flag without the tensor: SAELens sets it to false and loads the SAE unscaled.
    missing = saes.load_sae(write(tmp_path / "missing", cfg, weights("standard")))
    check(missing, *reference(pre_6_cfg(), weights("standard"), x, arch="standard"), x)


def test_expected_average_only_in_with_input_scale(tmp_path):
    """The dataset scale s the folder does not hold: the SAE reads s * x and its reconstruction is divided by s."""
    cfg, t, x = v6_cfg("topk", k=5, normalize_activations="expected_average_only_in"), weights("topk"), inputs()
    sae = saes.load_sae(write(tmp_path / "ea", cfg, t), input_scale=2.5)
    codes_ref, recon_ref = reference({**cfg, "normalize_activations": "none"}, t, x * 2.5)
    check(sae, codes_ref, recon_ref / 2.5, x)


def test_dtype_from_cfg(tmp_path):
    cfg, t = v6_cfg("standard", dtype="float64"), weights("standard")
    sae = saes.load_sae(write(tmp_path / "f64", cfg, t))
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"


# ---- refusals ---------------------------------------------------------------------------------------------------
def truncated(folder: Path) -> None:
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


REFUSALS = {
    "expected_average_only_in": (lambda: (v6_cfg("standard", normalize_activations="expected_average_only_in"),
                                          weights("standard")), ["normalize_activations", "expected_average_only_in",
                                                                 "cfg.json"]),
    "pre_6_normalize_true": (lambda: (pre_6_cfg(normalize_activations=True), weights("standard")),
                             ["expected_average_only_in", "cfg.json"]),
    "covariance_whitening": (lambda: (v6_cfg("standard", normalize_activations="covariance_whitening"),
                                      weights("standard")), ["normalize_activations", "covariance_whitening"]),
    "skip_transcoder": (lambda: (v6_cfg("skip_transcoder", d_out=D_IN),
                                 {**weights("transcoder"), "W_skip": torch.zeros(D_IN, D_IN)}),
                        ["architecture", "skip_transcoder"]),
    "jumprelu_skip_transcoder": (lambda: (v6_cfg("jumprelu_skip_transcoder", d_out=D_IN),
                                          {**weights("jumprelu"), "W_skip": torch.zeros(D_IN, D_IN)}),
                                 ["architecture", "jumprelu_skip_transcoder"]),
    "transcoder_d_out": (lambda: (v6_cfg("transcoder", d_out=D_IN + 1), weights("transcoder")), ["d_out"]),
    "transcoder_layer_norm": (lambda: (v6_cfg("transcoder", d_out=D_IN, normalize_activations="layer_norm"),
                                       weights("transcoder")), ["normalize_activations", "layer_norm"]),
    "hook_head_index_pre_6": (lambda: (pre_6_cfg(hook_point_head_index=3), weights("standard")),
                              ["hook_head_index"]),
    "hook_head_index_v6": (lambda: (v6_cfg("standard", metadata={"hook_head_index": 3}), weights("standard")),
                           ["hook_head_index"]),
    "unknown_architecture": (lambda: (v6_cfg("temporal"), weights("standard")), ["temporal", "architecture"]),
    "activation_fn": (lambda: (pre_6_cfg(activation_fn_str="tanh-relu"), weights("standard")),
                      ["activation_fn", "tanh-relu"]),
    "topk_without_k": (lambda: (pre_6_cfg(architecture="topk"), weights("topk")), ["'k'", "cfg.json"]),
    "W_enc_transposed": (lambda: (v6_cfg("standard"), {**weights("standard"), "W_enc": weights("standard")["W_enc"].T}),
                         ["W_enc", "(64, 16)", "(16, 64)", "sae_weights.safetensors"]),
    "W_dec_wrong": (lambda: (v6_cfg("topk", k=4), {**weights("topk"), "W_dec": torch.zeros(D_SAE, D_IN + 1)}),
                    ["W_dec", "sae_weights.safetensors"]),
    "threshold_wrong": (lambda: (v6_cfg("jumprelu"), {**weights("jumprelu"), "threshold": torch.ones(D_SAE + 1)}),
                        ["threshold", "sae_weights.safetensors"]),
    "threshold_missing": (lambda: (v6_cfg("jumprelu"), {k: v for k, v in weights("jumprelu").items()
                                                        if k != "threshold"}), ["threshold"]),
    "negative_threshold": (lambda: (v6_cfg("jumprelu"), {**weights("jumprelu"), "threshold": -torch.ones(D_SAE)}),
                           ["threshold", "negative"]),
    "gated_without_r_mag": (lambda: (v6_cfg("gated"), {k: v for k, v in weights("gated").items() if k != "r_mag"}),
                            ["r_mag"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_are_one_sentence_naming_the_key_or_file(tmp_path, name):
    make, names = REFUSALS[name]
    cfg, tensors = make()
    folder = write(tmp_path / name, cfg, tensors)
    with pytest.raises(LayoutError) as error:
        saelens.load(folder)
    message = str(error.value)
    assert "\n" not in message, message
    for part in names:
        assert part in message, message


def test_truncated_weights_are_refused_naming_the_file(tmp_path):
    folder = write(tmp_path / "cut", v6_cfg("standard"), weights("standard"))
    truncated(folder)
    with pytest.raises(LayoutError) as error:
        saelens.load(folder)
    assert "sae_weights.safetensors" in str(error.value) and "truncated" in str(error.value)


def test_unreadable_cfg(tmp_path):
    folder = write(tmp_path / "bad", v6_cfg("standard"), weights("standard"))
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(LayoutError, match="cfg.json"):
        saelens.load(folder)
