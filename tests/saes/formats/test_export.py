"""saes/formats/export.py: SAEs written in SAELens's and sparsify's layouts load back through our layout loaders with
the same codes and reconstructions (the real libraries are checked in tests/saes/test_saelens_compat.py and
test_sparsify_compat.py), refuse what the target cannot express, and never leave a half-written folder."""
import json

import pytest
import torch
from safetensors.torch import load_file

import saes
from saes import build_sae, save_sae
from saes.formats import export as export_mod
from saes.formats.export import ExportError, export_run, export_sae, hook_to_hf_module

D_IN, D_SAE = 16, 64
HOOK = "blocks.1.hook_resid_post"


def make(name: str, seed: int = 0, **fields):
    """An SAE with non-trivial biases, decoder norms and an unfolded input scale; calibrated where it needs it."""
    fields.setdefault("input_scale", 1.7)
    sae = build_sae(name, seed=seed, d_in=D_IN, d_sae=D_SAE, hook_name=fields.pop("hook_name", HOOK),
                    model_name="tiny", **fields)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3, generator=g)
        if not sae.tied:
            sae.b_enc.normal_(0, 0.2, generator=g)
            sae.W_enc.add_(torch.randn(D_SAE, D_IN, generator=g) * 0.1)
        if name == "gated":
            sae.r_mag.normal_(0, 0.3, generator=g)
            sae.b_mag.normal_(0, 0.2, generator=g)
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.Tensor) and name != "jumprelu":
            sae.threshold.fill_(0.15)  # what calibration would set
    return sae


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(48, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def assert_same(loaded, sae, x):
    with torch.no_grad():
        ref = sae.export_inference()
        codes = loaded.encode(x)
        torch.testing.assert_close(codes.float(), ref.encode(x).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(codes).float(), ref.decode(ref.encode(x)).float(), atol=1e-5,
                                   rtol=1e-5)


SAELENS = {  # name -> (our architecture, fields, SAELens architecture written)
    "topk": ("topk", {"k": 4}, "topk"),
    "gradient_topk": ("gradient_topk", {"k": 4}, "topk"),
    "hierarchical_topk_k": ("hierarchical_topk", {"k_max": 8, "k": 3}, "topk"),
    "hierarchical_topk_kmax": ("hierarchical_topk", {"k_max": 6}, "topk"),
    "abstopk_per_token": ("abstopk", {"k": 4, "selection": "per_token"}, "abstopk"),
    "relu_l1": ("relu_l1", {}, "standard"),
    "relu_l1_b_dec_in": ("relu_l1", {"apply_b_dec_to_input": True}, "standard"),
    "jumprelu": ("jumprelu", {"threshold_init": 0.1}, "jumprelu"),
    "jumprelu_b_dec_in": ("jumprelu", {"threshold_init": 0.1, "apply_b_dec_to_input": True}, "jumprelu"),
    "gated": ("gated", {}, "gated"),
    "batchtopk": ("batchtopk", {"k": 4}, "jumprelu"),
    "mutual_choice": ("mutual_choice", {"k": 4}, "jumprelu"),
    "feature_choice": ("feature_choice", {"k": 4}, "jumprelu"),
    "topk_layer_norm": ("topk", {"k": 4, "token_norm": "layer_norm", "input_scale": 1.0}, "topk"),
    "relu_l1_constant_norm": ("relu_l1", {"token_norm": "constant_norm_rescale", "input_scale": 1.0}, "standard"),
}


@pytest.mark.parametrize("name", list(SAELENS))
def test_saelens_export_loads_back_with_equal_outputs(tmp_path, name):
    arch, fields, written = SAELENS[name]
    sae, x = make(arch, **fields), inputs()
    folder = export_sae(sae, tmp_path / name, "saelens")
    assert folder == tmp_path / name
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert "saewb" not in cfg and cfg["architecture"] == written
    assert cfg["metadata"]["model_name"] == "tiny" and cfg["metadata"]["hook_name"] == HOOK
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["normalize_activations"] == sae.cfg.token_norm
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    loaded = saes.load_sae(folder)  # not native (no "saewb"): read by the saelens layout loader
    assert loaded.cfg.metadata["source"]["layout"] == "saelens"
    assert_same(loaded, sae, x)
    if written in ("topk", "abstopk"):
        expected_k = fields.get("k") or fields.get("k_max")
        assert cfg["k"] == expected_k and cfg["rescale_acts_by_decoder_norm"] is False


def test_saelens_export_of_mp_runs_exactly_k_steps():
    cfg, tensors = export_mod.saelens_folder(make("matching_pursuit", k=4))
    assert cfg["architecture"] == "matching_pursuit" and cfg["max_iterations"] == 4
    assert cfg["residual_threshold"] == 0.0 and cfg["stop_on_duplicate_support"] is False
    assert set(tensors) == {"W_dec", "b_dec"}


@pytest.mark.parametrize("make_sae,fmt,words", [
    (lambda: make("abstopk", k=4, selection="batch"), "saelens", ["AbsTopK", "per_token"]),
    (lambda: make("matching_pursuit_signed", k=4), "saelens", ["signed"]),
    (lambda: make("matching_pursuit", k=4, residual_threshold=0.1), "saelens", ["residual_threshold"]),
    (lambda: build_sae("batchtopk", d_in=D_IN, d_sae=D_SAE, k=4), "saelens", ["calibrat"]),
    (lambda: make("relu_l1"), "sparsify", ["relu_l1", "sparsify"]),
    (lambda: make("jumprelu"), "sparsify", ["jumprelu"]),
    (lambda: make("batchtopk", k=4), "sparsify", ["batchtopk"]),
    (lambda: make("abstopk", k=4, selection="per_token"), "sparsify", ["abstopk"]),
    (lambda: make("matching_pursuit", k=4), "sparsify", ["matching_pursuit"]),
    (lambda: make("topk", k=4, token_norm="layer_norm"), "sparsify", ["layer_norm"]),
    (lambda: make("topk", k=4, hook_name="blocks.1.attn.hook_z"), "sparsify", ["blocks.1.attn.hook_z", "hookpoint="]),
    (lambda: make("topk", k=4), "onnx", ["onnx", "saelens", "sparsify"]),
], ids=["abstopk_batch", "signed_mp", "mp_early_stop", "uncalibrated", "sparsify_relu_l1", "sparsify_jumprelu",
        "sparsify_batchtopk", "sparsify_abstopk", "sparsify_mp", "sparsify_token_norm", "sparsify_unknown_hook",
        "unknown_format"])
def test_refusals_are_one_sentence_and_write_nothing(tmp_path, make_sae, fmt, words):
    sae = make_sae()
    with pytest.raises(ExportError) as error:
        export_sae(sae, tmp_path / "out", fmt)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "out").exists()


def test_sparsify_export_naming_orientation_and_round_trip(tmp_path):
    sae, x = make("topk", k=4, multi_topk=True), inputs()
    folder = export_sae(sae, tmp_path / "run", "sparsify")
    assert folder == tmp_path / "run" / "layers.1"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg == {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE,
                   "k": 4, "multi_topk": True, "skip_connection": False, "transcode": False, "d_in": D_IN}
    tensors = load_file(str(folder / "sae.safetensors"))
    ref = sae.export_inference()
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    torch.testing.assert_close(tensors["encoder.weight"], ref.W_enc.detach())  # nn.Linear [n, d]: no transpose
    torch.testing.assert_close(tensors["W_dec"], ref.W_dec.detach())
    torch.testing.assert_close(tensors["b_dec"], ref.b_dec.detach())  # the input scale is folded
    assert not torch.allclose(tensors["b_dec"], sae.b_dec.detach())
    loaded = saes.load_sae(tmp_path / "run")  # a run with one hookpoint
    assert loaded.cfg.metadata["source"]["layout"] == "sparsify" and loaded.cfg.hook_name == HOOK
    assert_same(loaded, sae, x)


@pytest.mark.parametrize("arch,fields,k", [("gradient_topk", {"k": 5}, 5),
                                           ("hierarchical_topk", {"k_max": 8, "k": 3}, 3),
                                           ("hierarchical_topk", {"k_max": 8}, 8)])
def test_sparsify_export_of_the_topk_family(tmp_path, arch, fields, k):
    sae, x = make(arch, **fields), inputs()
    folder = export_sae(sae, tmp_path / "run", "sparsify")
    assert json.loads((folder / "cfg.json").read_text())["k"] == k
    assert_same(saes.load_sae(folder), sae, x)


def test_sparsify_hookpoints_and_several_in_one_run(tmp_path):
    a = make("topk", k=4, hook_name="blocks.0.hook_resid_post")
    b = make("topk", seed=1, k=3, hook_name="blocks.2.hook_mlp_out")
    export_sae(a, tmp_path / "run", "sparsify")
    export_sae(b, tmp_path / "run", "sparsify")
    custom = export_sae(a, tmp_path / "run", "sparsify", hookpoint="h.0")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["h.0", "layers.0", "layers.2.mlp"]
    assert custom.name == "h.0"
    x = inputs()
    assert_same(saes.load_sae(tmp_path / "run", hookpoint="layers.2.mlp"), b, x)
    assert saes.load_sae(tmp_path / "run" / "layers.2.mlp").cfg.hook_name == "blocks.2.hook_mlp_out"
    export_sae(b, tmp_path / "run", "sparsify", hookpoint="layers.0")  # replaces that hookpoint only
    assert_same(saes.load_sae(tmp_path / "run" / "layers.0"), b, x)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.11.hook_resid_post", "blocks.3.hook_mlp_out",
                                  "blocks.2.hook_attn_out", "hook_embed"])
def test_hookpoint_names_invert_hf_module_to_hook(hook):
    from training.model import hf_module_to_hook

    assert hf_module_to_hook(hook_to_hf_module(hook)) == hook


def test_resid_pre_is_the_previous_blocks_output():
    from training.model import hf_module_to_hook

    assert hook_to_hf_module("blocks.4.hook_resid_pre") == "layers.3"
    assert hf_module_to_hook("layers.3") == "blocks.3.hook_resid_post"
    with pytest.raises(ExportError, match="hookpoint="):
        hook_to_hf_module("blocks.0.hook_resid_pre")


# ---- atomic writes ------------------------------------------------------------------------------------------------
def crash_after_weights(monkeypatch):
    real = export_mod._write

    def broken(folder, cfg_name, weights_name, cfg, tensors):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / weights_name))
        (folder / cfg_name).write_text(json.dumps(cfg)[:20])  # half a cfg.json, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_write", broken)
    return real


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_an_interrupted_export_leaves_the_previous_folder(tmp_path, monkeypatch, fmt):
    old, new, x = make("topk", k=4), make("topk", seed=3, k=2), inputs()
    target = export_sae(old, tmp_path / "out", fmt)
    crash_after_weights(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_sae(new, tmp_path / "out", fmt)
    assert_same(saes.load_sae(target), old, x)  # the previous export, whole
    leftovers = [p for p in target.parent.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_an_interrupted_first_export_leaves_nothing_that_loads(tmp_path, monkeypatch):
    crash_after_weights(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_sae(make("topk", k=4), tmp_path / "out", "saelens")
    assert not (tmp_path / "out").exists()
    with pytest.raises(KeyboardInterrupt):
        export_sae(make("topk", k=4), tmp_path / "run", "sparsify")
    assert not (tmp_path / "run" / "layers.1").exists()
    assert not any(p.name != "run" for p in tmp_path.iterdir())


def test_a_failed_rename_puts_the_previous_export_back(tmp_path, monkeypatch):
    old, x = make("topk", k=4), inputs()
    target = export_sae(old, tmp_path / "out", "saelens")
    real_replace = export_mod.os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", flaky)
    with pytest.raises(OSError):
        export_sae(make("topk", seed=4, k=2), tmp_path / "out", "saelens")
    assert_same(saes.load_sae(target), old, x)


def test_foreign_folders_are_not_overwritten(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "readme.txt").write_text("mine")
    with pytest.raises(ExportError, match="readme.txt"):
        export_sae(make("topk", k=4), out, "saelens")
    assert (out / "readme.txt").read_text() == "mine"


# ---- export_run ---------------------------------------------------------------------------------------------------
def test_export_run_single_sae(tmp_path):
    sae, x = make("topk", k=4), inputs()
    run = save_sae(sae, tmp_path / "run")
    (run / "metrics.jsonl").write_text("{}\n")
    folder = export_run(run, "saelens")
    assert folder == run / "export-saelens"
    assert_same(saes.load_sae(folder), sae, x)
    assert saes.is_native(run)  # the run folder itself is untouched
    sparsify_folder = export_run(run, "sparsify", tmp_path / "sp")
    assert sorted(p.name for p in sparsify_folder.iterdir()) == ["layers.1"]
    assert_same(saes.load_sae(sparsify_folder), sae, x)
    assert_same(saes.load_sae(export_run(run, "saelens")), sae, x)  # a second export replaces the first


def test_export_run_several_saes(tmp_path):
    x = inputs()
    run = tmp_path / "run"
    members = {"topk_k4": make("topk", k=4), "topk_k2": make("topk", seed=2, k=2),
               "batchtopk_k4": make("batchtopk", k=4)}
    for name, sae in members.items():
        save_sae(sae, run / name)
    (run / "config.json").write_text("{}")
    out = export_run(run, "saelens", tmp_path / "lens")
    assert sorted(p.name for p in out.iterdir()) == sorted(members)
    for name, sae in members.items():
        assert_same(saes.load_sae(out / name), sae, x)
    with pytest.raises(ExportError, match="batchtopk_k4"):  # one SAE sparsify cannot hold: nothing is written
        export_run(run, "sparsify", tmp_path / "sp")
    assert not (tmp_path / "sp").exists()
    del members["batchtopk_k4"]
    import shutil

    shutil.rmtree(run / "batchtopk_k4")
    same_hook = export_run(run, "sparsify", tmp_path / "sp")  # two SAEs on one hook: one sparsify run each
    assert sorted(p.relative_to(same_hook).as_posix() for p in same_hook.glob("*/*")) == \
        ["topk_k2/layers.1", "topk_k4/layers.1"]
    for name, sae in members.items():
        assert_same(saes.load_sae(same_hook / name), sae, x)


def test_export_run_distinct_hooks_make_one_sparsify_run(tmp_path):
    run = tmp_path / "run"
    a, b = make("topk", k=4, hook_name="blocks.0.hook_resid_post"), make("topk", seed=1, k=4,
                                                                          hook_name="blocks.1.hook_resid_post")
    save_sae(a, run / "a")
    save_sae(b, run / "b")
    out = export_run(run, "sparsify")
    assert out == run / "export-sparsify"
    assert sorted(p.name for p in out.iterdir()) == ["layers.0", "layers.1"]
    assert_same(saes.load_sae(out, hookpoint="layers.0"), a, inputs())


def test_export_run_needs_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="saewb train"):
        export_run(tmp_path / "empty", "saelens")
