"""Gemma Scope 1 (params.npz) and 2 (params.safetensors) folders load with the codes and reconstructions of the
Gemma Scope tutorial's JumpReLUSAE, computed here in plain torch from the raw file tensors; the release path
states hook, model and L0; bad files are refused with one sentence."""
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saes import load_sae
from saes.formats import LayoutError, detect_layout

D_IN, D_SAE = 16, 64
GS1 = "gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
GS2 = "gemma-scope-2-1b-it/resid_post/layer_7_width_16k_l0_small"


def random_params(seed: int, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    """Gemma Scope tensors (input-major W_enc) with non-trivial biases; thresholds leave roughly a third active."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5,
        "b_enc": 0.2 * torch.randn(d_sae, generator=g),
        "b_dec": 0.5 * torch.randn(d_in, generator=g),
        "threshold": 0.1 + 0.4 * torch.rand(d_sae, generator=g),
    }
    return {k: v.numpy().astype(np.float32) for k, v in params.items()}


def reference(params: dict[str, np.ndarray], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's JumpReLUSAE.encode/decode on the raw arrays, in float64."""
    p = {k: torch.from_numpy(np.asarray(v)).double() for k, v in params.items()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    codes = (pre > p["threshold"]) * torch.relu(pre)
    return codes, codes @ p["W_dec"] + p["b_dec"]


def write_gs1(root, rel: str = GS1, params: dict | None = None, seed: int = 0):
    folder = root / rel
    folder.mkdir(parents=True)
    params = params if params is not None else random_params(seed)
    np.savez(folder / "params.npz", **params)
    return folder, params


def write_gs2(root, rel: str = GS2, params: dict | None = None, seed: int = 1, **extra):
    folder = root / rel
    folder.mkdir(parents=True)
    params = params if params is not None else random_params(seed)
    tensors = {k.lower(): torch.from_numpy(v).contiguous() for k, v in params.items()}
    tensors.update({k: v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(folder / "params.safetensors"))
    return folder, params


def inputs(seed: int = 5, n: int = 200) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_matches(sae, params, x, atol=1e-5):
    ref_codes, ref_recon = reference(params, x)
    codes = sae.encode(x)
    active = (ref_codes > 0).float().mean().item()
    assert 0.05 < active < 0.8, f"test data leaves {active:.0%} of latents active"
    torch.testing.assert_close(codes.double(), ref_codes, atol=atol, rtol=0)
    torch.testing.assert_close(sae.decode(codes).double(), ref_recon, atol=atol, rtol=0)


def test_gemma_scope_1_npz_matches_reference_and_states_release_facts(tmp_path):
    folder, params = write_gs1(tmp_path)
    assert detect_layout(folder) == "gemma_scope"
    sae = load_sae(folder)
    assert sae.architecture == "jumprelu" and sae.cfg.d_in == D_IN and sae.cfg.d_sae == D_SAE
    assert_matches(sae, params, inputs())
    source = sae.cfg.metadata["source"]
    assert (source["layout"], source["hook"], source["model"], source["l0"]) == \
        ("gemma_scope", "blocks.20.hook_resid_post", "google/gemma-2-2b", 71.0)
    assert sae.cfg.hook_name == "blocks.20.hook_resid_post" and not source["transcoder"]
    assert_matches(load_sae(folder / "params.npz"), params, inputs(6))  # the file itself also loads


def test_b_dec_is_not_subtracted(tmp_path):
    """A large b_dec would shift every pre-activation if it were subtracted before encoding."""
    params = random_params(2)
    params["b_dec"] = (params["b_dec"] + 3.0).astype(np.float32)
    folder, _ = write_gs1(tmp_path, params=params)
    assert_matches(load_sae(folder), params, inputs())


@pytest.mark.parametrize("repo, hook", [
    ("gemma-scope-9b-it-mlp", "blocks.9.hook_mlp_out"),
    ("gemma-scope-27b-pt-att", "blocks.9.attn.hook_z"),
    ("gemma-scope-2b-pt-res-canonical", "blocks.9.hook_resid_post"),
])
def test_gemma_scope_1_hook_from_release_name(tmp_path, repo, hook):
    folder, _ = write_gs1(tmp_path, f"{repo}/layer_9/width_16k/canonical")
    source = load_sae(folder).cfg.metadata["source"]
    assert source["hook"] == hook and source["l0"] is None
    model = {"9b-it": "google/gemma-2-9b-it", "27b-pt": "google/gemma-2-27b", "2b-pt": "google/gemma-2-2b"}
    assert source["model"] == next(v for k, v in model.items() if k in repo)


def test_gemma_scope_1_transcoder_and_unknown_paths(tmp_path):
    folder, _ = write_gs1(tmp_path, "gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_12")
    source = load_sae(folder).cfg.metadata["source"]
    assert (source["hook"], source["hook_out"], source["transcoder"], source["l0"]) == \
        ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out", True, 12.0)
    folder, _ = write_gs1(tmp_path, "my_sae")
    source = load_sae(folder).cfg.metadata["source"]
    assert (source["hook"], source["model"], source["l0"]) == (None, None, None)


def test_gemma_scope_2_safetensors_matches_reference(tmp_path):
    folder, params = write_gs2(tmp_path)
    assert detect_layout(folder) == "gemma_scope"
    sae = load_sae(folder)
    assert_matches(sae, params, inputs())
    source = sae.cfg.metadata["source"]
    assert (source["hook"], source["model"], source["l0"], source["generation"]) == \
        ("blocks.7.hook_resid_post", "google/gemma-3-1b-it", None, 2)
    folder, _ = write_gs2(tmp_path, "gemma-scope-2-270m-pt/mlp_out/layer_4_width_16k_l0_big")
    source = load_sae(folder).cfg.metadata["source"]
    assert (source["hook"], source["model"]) == ("blocks.4.hook_mlp_out", "google/gemma-3-270m")


def test_negative_thresholds_load_exactly(tmp_path):
    """relu(u) * [u > θ] with θ < 0 is u * [u > 0]: the loader clamps θ at 0 and the codes stay equal."""
    params = random_params(3)
    params["threshold"][:20] = -0.3
    folder, _ = write_gs1(tmp_path, params=params)
    sae = load_sae(folder)
    assert sae.cfg.metadata["source"]["negative_thresholds"] == 20
    assert_matches(sae, params, inputs())


def test_square_sae_uses_the_names_not_the_shapes(tmp_path):
    """d_in == d_sae: W_enc is applied input-major as the format says (x @ W_enc), never guessed from shapes."""
    params = random_params(4, d_in=D_IN, d_sae=D_IN)
    params["threshold"] = (0.05 * np.ones(D_IN)).astype(np.float32)
    folder, _ = write_gs1(tmp_path, params=params)
    sae = load_sae(folder)
    assert sae.cfg.d_in == sae.cfg.d_sae == D_IN
    assert_matches(sae, params, inputs())
    folder2, _ = write_gs2(tmp_path, params=params)
    assert_matches(load_sae(folder2), params, inputs())


def test_skip_connection_and_cross_layer_transcoders_are_refused(tmp_path):
    skip = torch.randn(D_IN, D_IN)
    folder, _ = write_gs2(tmp_path, "gemma-scope-2-1b-pt/transcoder_all/layer_3_width_16k_affine",
                          affine_skip_connection=skip)
    with pytest.raises(LayoutError, match="affine skip connection.*cannot express"):
        load_sae(folder)
    folder, _ = write_gs2(tmp_path, "gemma-scope-2-1b-pt/clt/width_16k")
    with pytest.raises(LayoutError, match="cross-layer transcoder"):
        load_sae(folder)


def test_bad_files_give_one_sentence(tmp_path):
    folder, _ = write_gs1(tmp_path, "truncated")
    data = (folder / "params.npz").read_bytes()
    (folder / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayoutError, match=r"params.npz is not a readable .npz file.*download or copy it again"):
        load_sae(folder)

    folder, _ = write_gs2(tmp_path, "truncated2")
    data = (folder / "params.safetensors").read_bytes()
    (folder / "params.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayoutError, match="not a readable safetensors file"):
        load_sae(folder)

    wrong = dict(random_params(0))
    wrong["W_dec"] = np.ascontiguousarray(wrong["W_dec"].T)  # [d_in, d_sae]: transposed
    folder, _ = write_gs1(tmp_path, "wrong_shape", params=wrong)
    with pytest.raises(LayoutError, match=r"tensor 'W_dec' has shape \(16, 64\), expected \(64, 16\)"):
        load_sae(folder)

    missing = {k: v for k, v in random_params(0).items() if k != "threshold"}
    folder, _ = write_gs1(tmp_path, "missing", params=missing)
    with pytest.raises(LayoutError, match="has no tensor 'threshold'"):
        load_sae(folder)

    folder = tmp_path / "pickled"
    folder.mkdir()
    np.savez(folder / "params.npz", W_enc=np.array([{"not": "numbers"}], dtype=object), **{
        k: v for k, v in random_params(0).items() if k != "W_enc"})
    with pytest.raises(LayoutError, match="pickled objects.*refusing"):
        load_sae(folder)

    folder, _ = write_gs1(tmp_path, "scale")
    with pytest.raises(LayoutError, match="input_scale does not apply"):
        load_sae(folder, input_scale=2.0)
    assert zipfile.is_zipfile(folder / "params.npz")
