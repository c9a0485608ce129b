"""Damaged files: each command that reads one stops with one sentence naming the file and the fix and exits 1;
following the fix gives the uninterrupted result. Damaged checkpoints are skipped on resume, which says so.
(These run `app.cli.main` in this process: the message and exit code are the command's own.)"""
import json
import shutil

import pytest
import torch

from tests.faults.conftest import (assert_same_tensors, cache_argv, cli, copy_run, eval_argv, features_argv,
                                   in_process, shard_digests, train_argv)
from training.checkpoint import CHECKSUMS, STATE, list_checkpoints, load_checkpoint, resume_checkpoint


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(path) -> None:
    manifest = json.loads(path.read_text())
    manifest["stats"]["blocks.1.hook_resid_post"]["median_norm"] *= 2  # a "harmless" hand edit
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def cache_copy(ref, tmp_path):
    return shutil.copytree(ref["cache"], tmp_path / "cache", ignore=shutil.ignore_patterns(".lock"))


def shard_fix(cache) -> str:
    return f"delete the folder {cache} and run the same `saewb cache` command again."


@pytest.mark.parametrize("damage", ["truncated shard", "flipped byte", "missing shard", "edited manifest",
                                    "truncated manifest"])
def test_a_damaged_cache_stops_training_with_one_sentence(damage, ref, cache_copy, tmp_path, capsys):
    shard, manifest = cache_copy / "shard_00005.safetensors", cache_copy / "manifest.json"
    expected = {
        "truncated shard": (truncate, shard, f"Shard {shard} is corrupted (its sha256 differs from manifest.json's: "
                                             f"truncated or altered): {shard_fix(cache_copy)}"),
        "flipped byte": (flip_byte, shard, f"Shard {shard} is corrupted (its sha256 differs from manifest.json's: "
                                           f"truncated or altered): {shard_fix(cache_copy)}"),
        "missing shard": (lambda p: p.unlink(), shard,
                          f"Shard {shard} is missing (manifest.json lists it): {shard_fix(cache_copy)}"),
        "edited manifest": (edit_manifest, manifest, f"Cache manifest {manifest} was changed after it was written (its "
                                                     f"checksum no longer matches): {shard_fix(cache_copy)}"),
        "truncated manifest": (truncate, manifest, f"Cache manifest {manifest} is not valid JSON (truncated or "
                                                   f"edited): {shard_fix(cache_copy)}"),
    }
    apply, path, message = expected[damage]
    apply(path)
    rc, lines = cli(train_argv(cache_copy, tmp_path / "run"), capsys)
    assert rc == 1 and lines == [f"saewb: error: {message}"]
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists() and not list_checkpoints(tmp_path / "run")
    if damage == "flipped byte":  # following the fix (the same for every damage) gives the uninterrupted cache
        shutil.rmtree(cache_copy)
        in_process(cache_argv(cache_copy))
        assert shard_digests(cache_copy) == shard_digests(ref["cache"])


@pytest.mark.parametrize("command", ["features", "eval"])
def test_a_damaged_cache_stops_features_and_eval(command, ref, cache_copy, tmp_path, capsys):
    run = copy_run(ref["run"], tmp_path / "runs" / "run")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"cache": str(cache_copy)}))
    shard = cache_copy / "shard_00031.safetensors"  # the held-out shard: both commands read it
    flip_byte(shard)
    argv = features_argv(run) if command == "features" else eval_argv(run, tmp_path / "cmp")
    rc, lines = cli(argv, capsys)
    message = (f"Shard {shard} is corrupted (its sha256 differs from manifest.json's: truncated or altered): "
               f"{shard_fix(cache_copy)}")
    assert rc == 1 and lines == [f"saewb: error: {message}"]
    assert not (run / "features" / "index.json").exists() and not (run / "eval" / "metrics.json").exists()


def test_saewb_cache_verifies_a_finished_cache(cache_copy, capsys):
    flip_byte(cache_copy / "shard_00012.safetensors")
    rc, lines = cli(cache_argv(cache_copy), capsys)
    assert rc == 1 and lines == [f"saewb: error: Shard {cache_copy / 'shard_00012.safetensors'} is corrupted (its "
                                 "sha256 differs from manifest.json's: truncated or altered): "
                                 f"{shard_fix(cache_copy)}"]


@pytest.fixture
def trained(ref, tmp_path):
    """A run trained here (in its own folder, so `saewb train` with its arguments is the same job)."""
    run = tmp_path / "run"
    in_process(train_argv(ref["cache"], run))
    return run


def test_truncated_sae_weights_name_the_file_and_the_fix(trained, ref, capsys):
    weights = trained / "sae_weights.safetensors"
    truncate(weights)
    fix = (f"{weights} cannot be read (")
    for argv in (eval_argv(trained, trained.parent / "cmp"), features_argv(trained)):
        rc, lines = cli(argv, capsys)
        assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"saewb: error: {fix}")
        assert lines[0].endswith(f"): it is truncated or corrupted; delete it and {trained / 'summary.json'}, then run "
                                 "the same `saewb train` command again (it rewrites the weights from the final "
                                 "checkpoint).")
    # following the fix: the weights come back from the final checkpoint, equal to the uninterrupted run's
    weights.unlink()
    (trained / "summary.json").unlink()
    in_process(train_argv(ref["cache"], trained))
    assert_same_tensors(weights, ref["run"] / "sae_weights.safetensors")


def test_resume_skips_damaged_checkpoints_and_says_which(trained):
    older, newest = list_checkpoints(trained)[-2:]
    notes = []
    flip_byte(newest / "sae" / "sae_weights.safetensors")  # torch.load would not notice: the checksums do
    path, state = resume_checkpoint(trained, log=notes.append)
    assert path == older and state["step"] == int(older.name.split("_")[1])
    assert notes == [f"saewb: Checkpoint {newest}: sae/sae_weights.safetensors is truncated or corrupted (sha256 "
                     f"differs from {CHECKSUMS}): resuming from the previous one, {older} (delete {newest} once you "
                     "no longer need it)."]
    (older / STATE).unlink()  # no longer a checkpoint at all
    (newest / CHECKSUMS).unlink()  # a checkpoint from before checksums: trusted as it is...
    truncate(newest / STATE)  # ...but its state cannot be read
    notes.clear()
    assert resume_checkpoint(trained, log=notes.append) == (None, None)
    assert len(notes) == 1 and notes[0].startswith(f"saewb: Checkpoint {newest}: {STATE} cannot be read (")
    assert notes[0].endswith("): no older checkpoint: training starts over (delete "
                             f"{newest} once you no longer need it).")


class Payload:
    """Pickles to a call of os.system: what a crafted trainer_state.pt could run on torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(trained, tmp_path):
    newest = list_checkpoints(trained)[-1]
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "saes": Payload(marker)}, newest / STATE)
    (newest / CHECKSUMS).unlink()
    with pytest.raises(ValueError, match=rf"Checkpoint {newest}: {STATE} cannot be read \(.*[Ww]eights only"):
        load_checkpoint(newest)
    assert not marker.exists()
