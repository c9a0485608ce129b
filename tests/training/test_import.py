"""`saewb import`: a SAELens-layout SAE trained on the tiny model becomes a run folder that eval and the feature store
use; its fingerprint equals a reference computed here; a wrong hook, width, layout or folder is refused with one
sentence and nothing written."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.cli import main
from saes import build_sae, load_sae, save_sae
from training.activation_store import ActivationCache
from training.importing import L0_FACTOR, fingerprint, problems
from training.trainer import LoopConfig, train_sae

HOOK = "blocks.1.hook_resid_post"
K = 8


def strip_to_saelens(folder, hook: str = HOOK) -> None:
    """Make a save_sae folder look as SAELens writes it: no "saewb" section, SAELens's metadata keys only."""
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.pop("saewb")
    cfg["metadata"] = {"model_name": "tiny", "hook_name": hook, "sae_lens_version": "6.5.0"}
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def saelens_folder(tiny_cache, tmp_path_factory):
    """A TopK SAE trained on the tiny model's blocks.1 residual, saved in SAELens's layout."""
    torch.manual_seed(0)
    x = torch.cat([tiny_cache.shard_tokens(i, HOOK) for i in range(tiny_cache.n_shards)])
    scale = float(x.shape[1] ** 0.5 / x.norm(dim=1).mean())
    sae = build_sae("topk", d_in=64, d_sae=128, k=K, input_scale=scale)
    sae.init_b_dec(x)
    batches = [x[i:i + 256] for i in range(0, len(x) - 256, 256)]
    train_sae(sae, batches * 4, 4 * len(batches), LoopConfig(lr=3e-3, warmup_steps=10, dead_tokens=10**9),
              progress=False)
    folder = tmp_path_factory.mktemp("saelens") / "tiny-topk"
    save_sae(sae, folder)
    strip_to_saelens(folder)
    save_file({"sparsity": torch.linspace(-4, -1, 128)}, str(folder / "sparsity.safetensors"))  # SAELens: log10
    return folder


def source_sae(folder):
    return load_sae(folder).eval()


def reference_fingerprint(folder, cache: ActivationCache, hook: str) -> tuple[float, float]:
    """FVU and L0 from the raw SAELens tensors over every non-special cached token (outliers included)."""
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    W_enc, b_enc, W_dec, b_dec = (tensors[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = torch.cat([cache.shard_rows(i, [hook], outlier_factor=0) for i in range(cache.n_shards)]).double()
    pre = (x - b_dec) @ W_enc + b_enc
    values, indices = pre.topk(K, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    x_hat = codes @ W_dec + b_dec
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return float(fvu), float((codes != 0).sum(-1).double().mean())


def test_import_writes_a_run_that_eval_and_features_use(saelens_folder, tmp_path, capsys):
    out = tmp_path / "runs" / "imported"
    assert main(["import", str(saelens_folder), "--out", str(out), "--tokens", "4096"]) == 0  # model, hook: stated
    printed = capsys.readouterr().out
    assert "Import check" in printed and "FVU" in printed and f"saewb eval {out}" in printed
    summary = json.loads((out / "summary.json").read_text())
    record = json.loads((out / "import.json").read_text())
    assert summary["hook"] == HOOK and record["facts"]["layout"] == "saelens" and record["facts"]["l0"] == K
    cache = ActivationCache(summary["cache"])
    fvu, l0 = reference_fingerprint(saelens_folder, cache, HOOK)
    assert summary["fvu"] == pytest.approx(fvu, rel=1e-4) and summary["fvu"] < 0.5
    assert summary["l0"] == pytest.approx(l0, rel=1e-6)
    cache.manifest["outlier_factor"] = 0.5  # most tokens now count as outliers: the check must still see them all
    non_special = sum(int((~cache.read(i, "special").bool()).sum()) for i in range(cache.n_shards))
    assert fingerprint(source_sae(saelens_folder), cache, HOOK)["tokens"] == non_special == summary["eval_tokens"]
    density = load_file(str(out / "import_density.safetensors"))["log10_density"]
    assert density.shape == (128,) and float(density.max()) <= 0
    # the imported run is a run: same codes as the source, and the analyses accept it
    sae, source = load_sae(out), load_sae(saelens_folder)
    x = torch.randn(16, 64) * 3
    assert torch.allclose(sae.encode(x), source.encode(x), atol=1e-5)
    assert sae.cfg.metadata["source"]["layout"] == "saelens"
    from analysis.evals import report_card
    from analysis.features import FeaturesConfig, build_features

    card = report_card(out, max_contexts=2, budget_curve=False, n_boot=10)
    assert card["architecture"] == "topk" and card["hook"] == HOOK and card["model"] == "tiny"
    assert 0 < card["core"]["fvu"] < 1 and card["core"]["l0"] == pytest.approx(K)
    assert torch.isfinite(torch.tensor(card["downstream"]["ce_loss_recovered"]))
    assert (build_features(FeaturesConfig(run_dir=out)) / "index.json").is_file()
    # the app shows where it came from, and the densities its source states
    from streamlit.testing.v1 import AppTest

    import app

    at = AppTest.from_file(str(Path(app.__file__).parent / "streamlit_app.py"), default_timeout=90)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAEWB_RUNS_DIR", str(out.parent))
        at.run()
        assert not at.exception and any("Imported with `saewb import`" in i.value for i in at.info)
        at.query_params["latent"] = "127"
        at.switch_page("views/feature.py").run()
        assert not at.exception and any("source states a density of 10.000%" in c.value for c in at.caption)


def test_wrong_hook_fails_the_check_and_writes_nothing(saelens_folder, tmp_path, capsys):
    out = tmp_path / "wrong"
    assert main(["import", str(saelens_folder), "--hook", "blocks.1.hook_mlp_out", "--out", str(out),
                 "--tokens", "4096"]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("saewb: error: the import check failed: FVU") and "--force" in error
    assert "states hook 'blocks.1.hook_resid_post'" in captured.out
    assert not out.exists() and not list(tmp_path.glob(".wrong.tmp-*"))
    assert main(["import", str(saelens_folder), "--hook", "blocks.1.hook_mlp_out", "--out", str(out),
                 "--tokens", "4096", "--force"]) == 0
    assert json.loads((out / "import.json").read_text())["problems"][0].startswith("FVU")


def test_l0_check_flags_a_factor_of_three():
    fine = {"fvu": 0.2, "l0": 3 * 10.0}
    assert problems(fine, 10.0) == [] and problems({"fvu": 0.2, "l0": 10 / L0_FACTOR}, 10.0) == []
    assert "3.1x" in problems({"fvu": 0.2, "l0": 31.0}, 10.0)[0]
    assert "0.32x" in problems({"fvu": 0.2, "l0": 3.2}, 10.0)[0]
    assert problems({"fvu": 0.2, "l0": 0.0}, 10.0) and problems({"fvu": float("nan"), "l0": 5.0}, None)
    assert problems({"fvu": 1.2, "l0": 5.0}, None)[0].startswith("FVU 1.2 > 1")


class Payload:
    """Stands for any object a malicious pickle would build."""


def test_bad_sources_give_one_sentence_and_write_nothing(saelens_folder, tmp_path, capsys):
    wide = build_sae("topk", d_in=32, d_sae=64, k=4)
    save_sae(wide, tmp_path / "wide")
    strip_to_saelens(tmp_path / "wide")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"not an sae")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "cfg.json").write_text((saelens_folder / "cfg.json").read_text())
    (truncated / "sae_weights.safetensors").write_bytes((saelens_folder / "sae_weights.safetensors").read_bytes()[:500])
    evil = tmp_path / "evil"  # a dictionary_learning folder whose ae.pt pickles an object (code runs on unpickling)
    evil.mkdir()
    torch.save({"encoder.weight": torch.zeros(4, 4), "payload": Payload()}, evil / "ae.pt")
    (evil / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": 4,
                                                              "dict_size": 4}}))
    cases = [
        (evil, "holds pickled objects other than tensors"),
        (tmp_path / "wide", "width d_in=32 but tiny's 'blocks.1.hook_resid_post' has width 64"),
        (tmp_path / "junk", "holds no SAE layout this workbench knows. Known layouts: saelens"),
        (tmp_path / "missing", "does not exist"),
        (truncated, "is not a readable safetensors file"),
    ]
    for source, message in cases:
        out = tmp_path / "out"
        assert main(["import", str(source), "--out", str(out), "--tokens", "4096"]) == 1, source
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("saewb: error: ") and message in error, error
        assert not out.exists()
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["import", str(saelens_folder), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and (out / "x").read_text() == "keep"


def test_export_cli_writes_folders_that_load_back_with_the_same_codes(saelens_folder, tmp_path, capsys):
    run = tmp_path / "run"
    save_sae(load_sae(saelens_folder), run)
    x = torch.randn(32, 64) * 2
    expected = load_sae(run).encode(x)
    for fmt in ("saelens", "sparsify"):
        out = tmp_path / f"export-{fmt}"
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
        assert f"as {fmt} into {out}" in capsys.readouterr().out
        back = load_sae(out)
        assert back.cfg.metadata["source"]["layout"] == fmt
        assert torch.allclose(back.encode(x), expected, atol=1e-5)
    assert main(["export", str(run), "--format", "onnx"]) == 1
    assert "saelens" in capsys.readouterr().err
