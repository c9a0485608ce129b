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


# ---- edges: each one sentence and a non-zero exit ----------------------------------------------------------------
def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("saewb: error: "), lines
    return lines[-1]


def fake_run(folder):
    """A folder the app lists as a run (cfg.json + sae_weights.safetensors)."""
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    (folder / "sae_weights.safetensors").write_bytes(b"")
    return folder


def test_app_refuses_a_folder_without_runs(tmp_path, capsys):
    assert main(["app", str(tmp_path)]) == 1
    assert "No runs under" in last_error(capsys)
    assert main(["app", str(tmp_path / "nowhere")]) == 1
    assert "is missing" in last_error(capsys)


def test_app_refuses_a_port_in_use_before_starting_streamlit(tmp_path, capsys, monkeypatch):
    import socket
    import subprocess

    fake_run(tmp_path / "runs" / "one")
    started = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: started.append(a) or subprocess.CompletedProcess(a, 0))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", str(tmp_path / "runs"), "--port", str(port)]) == 1
    captured = capsys.readouterr()
    assert f"Port {port} is in use" in captured.err and "http://" not in captured.out and not started
    assert main(["app", str(tmp_path / "runs"), "--port", str(port)]) == 0  # free again: streamlit starts
    assert started and "--server.port" in started[0][0]


def test_missing_folders_are_called_missing(tmp_path, capsys):
    for args in (["eval", str(tmp_path / "gone")], ["features", str(tmp_path / "gone")],
                 ["circuits", "--run-dir", str(tmp_path / "gone")], ["export", str(tmp_path / "gone")]):
        assert main(args) == 1, args
        assert f"{tmp_path / 'gone'} is missing" in last_error(capsys)


def test_a_broken_manifest_is_named(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["cache", "--model", "tiny", "--tokens", "1024", "--out", str(out)]) == 0
    (out / "manifest.json").write_text("{truncated")
    assert main(["train", "--cache.model", "tiny", "--cache.tokens", "1024", "--cache.out", str(out),
                 "--run-dir", str(tmp_path / "r")]) == 1
    assert f"{out / 'manifest.json'} is not valid JSON" in last_error(capsys)
    from training.activation_store import ActivationCache, CacheError

    with pytest.raises(CacheError, match=f"Cache folder {tmp_path / 'gone'} is missing"):
        ActivationCache(tmp_path / "gone")


def test_a_wrong_model_name_fails_fast_with_the_nearest_name(tmp_path, capsys, monkeypatch):
    import training.model

    # offline (as in tests): the hub is not asked, and the nearest known name is suggested
    assert main(["cache", "--model", "smollm3", "--out", str(tmp_path / "c")]) == 1
    assert "Did you mean 'smollm2'?" in last_error(capsys)
    # online but the hub is unreachable: one sentence at once instead of the hub client's ~28 s of retries
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(training.model, "hub_reachable", lambda *a, **k: False)
    from transformer_lens.model_bridge import TransformerBridge

    def no_download(*args, **kwargs):  # the slow path (the hub client's retries) must not be taken at all
        raise AssertionError("load_model asked the hub although it is unreachable")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", no_download)
    assert main(["cache", "--model", "tinyy", "--hooks", "blocks.0.hook_resid_post", "--out", str(tmp_path / "c")]) == 1
    error = last_error(capsys)
    assert "hub is not reachable" in error and "Did you mean 'tiny'?" in error
    assert main(["cache", "--model", "./no/such/folder", "--out", str(tmp_path / "c")]) == 1
    assert "Model folder ./no/such/folder is missing" in last_error(capsys)


def test_cache_defaults_to_a_hook_the_model_has(tmp_path):
    out = tmp_path / "c"
    assert main(["cache", "--model", "tiny", "--tokens", "1024", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["key_fields"]["hooks"] == ["blocks.1.hook_resid_post"]


def test_different_jobs_list_the_fields_that_differ(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["cache", "--model", "tiny", "--tokens", "1024", "--out", str(out)]) == 0
    assert main(["cache", "--model", "tiny", "--tokens", "2048", "--out", str(out)]) == 1
    assert "tokens 1024 there, 2048 asked" in last_error(capsys)
    run = ["train", "--cache.model", "tiny", "--cache.tokens", "4096", "--cache.shard-tokens", "1024",
           "--batch-size", "256", "--wandb", "off", "--run-dir", str(tmp_path / "r")]
    assert main(run + ["--cache.out", str(tmp_path / "c2")]) == 0
    capsys.readouterr()
    assert main(run + ["--cache.out", str(tmp_path / "c2"), "--k", "16", "--seed", "1"]) == 1
    error = last_error(capsys)
    assert "holds a different training job (--k [32] there, [16] asked; --seed 0 there, 1 asked)" in error
    # resumed: the job says from which step
    (tmp_path / "r" / "summary.json").unlink()
    assert main(run + ["--cache.out", str(tmp_path / "c2")]) == 0
    steps = json.loads((tmp_path / "r" / "summary.json").read_text())["steps"]
    assert f"saewb: resuming {tmp_path / 'r'} from step {steps} of {steps}" in capsys.readouterr().err


def test_cache_flags_are_named_as_train_takes_them(capsys):
    assert main(["train", "--cache.model", "tiny", "--cache.tokens", "0"]) == 1
    assert "--cache.tokens must be positive, got 0." in last_error(capsys)
