"""The sparsify layout loader (saes/formats/sparsify.py) against a reference written here from EleutherAI sparsify's
source (eai-sparsify 1.3.3: sparsify/sparse_coder.py `encode`/`decode`, sparsify/fused_encoder.py, and the `signed`
rule of the `sae` package, commit a48257e): plain torch on the file's tensors, never the loader's code.

    encode: x' = x - b_dec unless transcode;  pre = relu(x' @ encoder.weight.T + encoder.bias);  top-k of pre
    decode: sum_j top_acts_j * W_dec[top_indices_j] + b_dec
    signed (legacy): pre = x' @ W.T + b without ReLU; top-k of |pre|, signed values kept
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import saes
from saes.formats import LayoutError, detect_layout, sparsify

D_IN, N = 16, 64


def tensors(seed: int = 0, d_in: int = D_IN, n: int = N, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # what save_model(SparseCoder) writes; W_dec rows deliberately not unit norm
        "encoder.weight": (torch.randn(n, d_in, generator=g) / d_in**0.5).to(dtype),
        "encoder.bias": (torch.randn(n, generator=g) * 0.2).to(dtype),
        "W_dec": (torch.randn(n, d_in, generator=g) * 0.3).to(dtype),
        "b_dec": (torch.randn(d_in, generator=g) * 0.5).to(dtype),
    }


def config(**overrides) -> dict:
    cfg = {"activation": "topk", "expansion_factor": N // D_IN, "normalize_decoder": True, "num_latents": N, "k": 5,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    return {**cfg, **overrides}


def write(folder: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def reference(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes, reconstruction) as sparsify computes them, in float64."""
    W, b, W_dec, b_dec = (t[name].double() for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    x = x.double()
    x_in = x if cfg.get("transcode") else x - b_dec
    pre = x_in @ W.T + b
    if cfg.get("signed"):
        indices = pre.abs().topk(cfg["k"], dim=-1, sorted=False).indices
        values = pre.gather(-1, indices)
    else:
        values, indices = pre.relu().topk(cfg["k"], dim=-1, sorted=False)  # ReLU first, then top-k
    codes = torch.zeros_like(pre).scatter(-1, indices, values)
    recon = (values[..., None] * W_dec[indices]).sum(-2) + b_dec  # embedding_bag(indices, W_dec, values)
    return codes, recon


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(40, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def check(sae, cfg, t, x, atol=1e-5):
    with torch.no_grad():
        codes_ref, recon_ref = reference(cfg, t, x)
        codes = sae.encode(x)
        torch.testing.assert_close(codes.double(), codes_ref, atol=atol, rtol=atol)
        torch.testing.assert_close(sae.decode(codes).double(), recon_ref, atol=atol, rtol=atol)
        assert int((codes != 0).sum(-1).max()) <= cfg["k"]


@pytest.mark.parametrize("overrides", [
    {},
    {"k": 1},
    {"num_latents": 0},  # 0 means d_in * expansion_factor
    {"normalize_decoder": False, "multi_topk": True},  # training-only keys
    {"transcode": True},
    {"signed": True},
    {"signed": False},  # the key old `sae` folders still carry
], ids=["topk", "k1", "expansion_factor", "training_keys", "transcode", "signed_legacy", "signed_false"])
def test_codes_and_reconstructions_equal_sparsify(tmp_path, overrides):
    cfg, t, x = config(**overrides), tensors(), inputs()
    folder = write(tmp_path / "run" / "layers.3", cfg, t)
    sae = saes.load_sae(folder)  # dispatched to the sparsify layout by its files
    check(sae, cfg, t, x)
    assert sae.architecture == ("abstopk" if cfg.get("signed") else "topk")
    source = sae.cfg.metadata["source"]
    assert source["layout"] == "sparsify" and source["l0"] == cfg["k"] and source["hookpoint"] == "layers.3"
    assert source["transcoder"] is bool(cfg.get("transcode"))


def test_square_sae_catches_a_wrong_orientation(tmp_path):
    """num_latents == d_in: a transposed encoder or decoder would still have the right shape."""
    cfg, t, x = config(num_latents=D_IN, expansion_factor=1, k=3), tensors(n=D_IN), inputs()
    check(saes.load_sae(write(tmp_path / "layers.0", cfg, t)), cfg, t, x)


def test_reference_is_sensitive_to_the_transcoder_rule(tmp_path):
    """The check above would catch a loader that subtracts b_dec for a transcoder, or skips the ReLU."""
    t, x = tensors(), inputs()
    codes_tc, _ = reference(config(transcode=True), t, x)
    codes_sae, _ = reference(config(), t, x)
    assert (codes_tc - codes_sae).abs().max() > 1e-2
    low = {**t, "encoder.bias": t["encoder.bias"] - 3.0}  # most pre-activations < 0: the ReLU matters
    pre = (x - low["b_dec"]) @ low["encoder.weight"].T + low["encoder.bias"]
    assert bool((pre.topk(5, dim=-1).values < 0).any())
    sae = saes.load_sae(write(tmp_path / "low", config(), low))
    check(sae, config(), low, x)
    assert bool((sae.encode(x) >= 0).all())


def test_dtype_follows_the_file(tmp_path):
    cfg, t = config(), tensors(dtype=torch.float64)
    sae = saes.load_sae(write(tmp_path / "layers.0", cfg, t))
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"
    check(sae, cfg, t, inputs().double(), atol=1e-10)
    half = saes.load_sae(write(tmp_path / "layers.1", cfg, tensors(dtype=torch.bfloat16)))
    assert half.W_dec.dtype == torch.bfloat16


@pytest.mark.parametrize("hookpoint,transcode,hook,hook_out", [
    ("layers.3", False, "blocks.3.hook_resid_post", None),
    ("layers.2.mlp", False, "blocks.2.hook_mlp_out", None),
    ("model.layers.4.self_attn", False, "blocks.4.hook_attn_out", None),
    ("layers.2.mlp", True, "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"),
    ("layers.5", True, "blocks.5.hook_resid_pre", "blocks.5.hook_resid_post"),
    ("custom.module", False, None, None),
])
def test_hookpoints_map_to_our_hooks(tmp_path, hookpoint, transcode, hook, hook_out):
    sae = sparsify.load(write(tmp_path / hookpoint, config(transcode=transcode), tensors()))
    source = sae.cfg.metadata["source"]
    assert (source["hook"], source["hook_out"]) == (hook, hook_out)
    assert sae.cfg.hook_name == (hook or "")


def test_run_folders(tmp_path):
    run = tmp_path / "run"
    write(run / "layers.1", config(), tensors(1))
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "sae": config()}))
    assert detect_layout(run) == "sparsify" and detect_layout(run / "layers.1") == "sparsify"
    one = saes.load_sae(run)  # exactly one hookpoint: loads it
    assert one.cfg.metadata["source"]["model"] == "HuggingFaceTB/SmolLM2-135M"
    assert one.cfg.model_name == "HuggingFaceTB/SmolLM2-135M"
    write(run / "layers.2", config(k=3), tensors(2))
    with pytest.raises(LayoutError) as error:
        saes.load_sae(run)
    message = str(error.value)
    assert "layers.1" in message and "layers.2" in message and "hookpoint=" in message and "\n" not in message
    two = saes.load_sae(run, hookpoint="layers.2")
    check(two, config(k=3), tensors(2), inputs())
    with pytest.raises(LayoutError, match="layers.9"):
        saes.load_sae(run, hookpoint="layers.9")


def test_seed_folders(tmp_path):
    run = tmp_path / "run"
    write(run / "layers.1" / "seed0", config(), tensors(0))
    write(run / "layers.1" / "seed1", config(), tensors(1))
    assert set(sparsify.hookpoint_folders(run)) == {"layers.1/seed0", "layers.1/seed1"}
    sae = saes.load_sae(run / "layers.1" / "seed1")
    assert sae.cfg.metadata["source"]["hook"] == "blocks.1.hook_resid_post"
    check(sae, config(), tensors(1), inputs())
    assert saes.load_sae(run, hookpoint="layers.1/seed0").cfg.metadata["source"]["hookpoint"] == "layers.1"


def test_not_detected_for_other_folders(tmp_path):
    other = tmp_path / "saelens"
    other.mkdir()
    (other / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "standard"}))
    save_file({"W_dec": torch.zeros(8, 4)}, str(other / "sae_weights.safetensors"))
    assert not sparsify.detect(other) and not sparsify.detect(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not sparsify.detect(empty)
    hidden = write(tmp_path / "run" / ".export.tmp-1" / "layers.0", config(), tensors())  # a half-written export
    assert not sparsify.detect(tmp_path / "run") and hidden.exists()


def truncate(folder: Path) -> None:
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("edit,names", [
    (lambda f, c, t: write(f, {**c, "activation": "groupmax"}, t), ["activation", "groupmax"]),
    (lambda f, c, t: write(f, {**c, "skip_connection": True}, {**t, "W_skip": torch.zeros(D_IN, D_IN)}),
     ["skip_connection"]),
    (lambda f, c, t: write(f, c, {**t, "W_skip": torch.zeros(D_IN, D_IN)}), ["W_skip", "sae.safetensors"]),
    (lambda f, c, t: write(f, {**c, "pkm_bias": True}, t), ["pkm_bias"]),
    (lambda f, c, t: write(f, {**c, "k": N + 1}, t), ["k=65"]),
    (lambda f, c, t: write(f, c, {**t, "encoder.weight": t["encoder.weight"].T}), ["encoder.weight", "(16, 64)"]),
    (lambda f, c, t: write(f, c, {**t, "W_dec": t["W_dec"].T}), ["W_dec", "(16, 64)"]),
    (lambda f, c, t: write(f, c, {k: v for k, v in t.items() if k != "b_dec"}), ["b_dec"]),
    (lambda f, c, t: write(f, c, {**t, "extra": torch.zeros(3)}), ["extra"]),
    (lambda f, c, t: (write(f, c, t), truncate(f)), ["sae.safetensors", "truncated"]),
], ids=["groupmax", "skip_connection", "W_skip", "unknown_key", "k_too_big", "encoder_transposed",
        "decoder_transposed", "missing_b_dec", "extra_tensor", "truncated"])
def test_refusals_name_the_key_or_file(tmp_path, edit, names):
    folder = tmp_path / "layers.0"
    edit(folder, config(), tensors())
    with pytest.raises(LayoutError) as error:
        sparsify.load(folder)
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
