"""The `saewb` command line: help for every command, the demo slice on the tiny model, clear errors."""
import json

import pytest
import torch

from app.cli import COMMANDS, main
from saes import load_sae


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: saewb" in text and "default" in text


def test_demo_on_tiny_model_leaves_a_saelens_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--tokens", "16384", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "L0 32.00" in out
    assert "Report card" in out and "CE loss recovered" in out and f"saewb app {tmp_path}" in out
    assert (run_dir / "eval" / "metrics.json").is_file() and (run_dir / "features" / "index.json").is_file()
    for name in ("cfg.json", "sae_weights.safetensors", "config.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    cfg = json.loads((run_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 32 and cfg["d_sae"] == 4 * cfg["d_in"] == 256
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["cache"]["model"] == "tiny" and config["architectures"] == ["topk"]
    summary = json.loads((run_dir / "summary.json").read_text())
    sae = load_sae(run_dir)
    x = torch.randn(5, 64)
    assert ((sae.encode(x) != 0).sum(-1) <= 32).all()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["steps"] and "fvu" in json.loads(lines[-1])
    assert 0 < summary["fvu"] < 1
    # idempotent: the second run skips the work
    assert main(["demo", "--model", "tiny", "--tokens", "16384", "--run-dir", str(run_dir)]) == 0
    assert "Already trained" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["cache", "--model", "tiny", "--hooks", "blocks.0.hook_resid_pots"], "Did you mean"),
    (["cache", "--model", "tiny", "--hooks", "blocks.9.hook_resid_post"], "out of range"),
    (["train", "--cache.model", "tiny", "--architectures", "nope"], "registered architectures: "),
    (["train", "--cache.model", "tiny", "--cache.hooks", "blocks.0.hook_resid_post", "--hooks", "blocks.1.hook_resid_post"],
     "not among"),
    (["cache", "--model", "tiny", "--tokens", "0"], "must be positive"),
    (["train", "--cache.model", "tiny", "--architectures", "batchtopk", "--sae-options", "threshold_decay", "0.9"],
     "--sae-options threshold_decay: no SAE of --architectures batchtopk has such a field"),
    (["train", "--cache.model", "tiny", "--loop.calibration-batches", "0"], "calibration-batches must be positive"),
])
def test_bad_input_gives_one_clear_sentence_and_nonzero_exit(args, message, capsys, tmp_path):
    assert main(args + ([] if args[0] == "train" else ["--out", str(tmp_path / "c")])) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("saewb: error: ") and message in last_line
    assert not (tmp_path / "c" / "manifest.json").exists()
