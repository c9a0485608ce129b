"""A full disk: pre-flight space checks refuse before any work (training checkpoints, the feature store; the cache's
is in tests/training/test_cache.py), and a write that fails half-way leaves nothing that reads as valid and names
the folder. (The file-size-limit version in a child process is in test_lifecycle.py; here a real tmpfs fills up
where this machine allows mounting one.)"""
import errno
import json
import os
import shutil
import subprocess

import pytest

import analysis.features as features
import training.caching as caching
from analysis.store import FeatureStore
from tests.faults.conftest import cache_argv, cli, copy_run, features_argv, in_process, shard_digests, train_argv
from training.activation_store import ActivationCache, CacheError
from training.checkpoint import list_checkpoints, save_checkpoint


class Full:
    free = 1000  # bytes


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Full)


def test_training_checks_room_for_its_checkpoints_first(ref, tmp_path, full_disk, capsys):
    run = tmp_path / "run"
    rc, lines = cli(train_argv(ref["cache"], run), capsys)
    assert rc == 1 and len(lines) == 1
    assert lines[0].startswith(f"saewb: error: Training into {run} (2 checkpoint(s) kept) needs about ")
    assert lines[0].endswith(f"MB but only 0.0 MB is free at {run}: free space, lower --keep-checkpoints, or pass a "
                             "--run-dir on a larger disk.")
    assert not list_checkpoints(run) and not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()


def test_a_checkpoint_checks_its_room_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from saes import build_sae
    from training.trainer import LoopConfig, Trainer

    trainer = Trainer({"sae": (build_sae("topk", d_in=16, d_sae=64, k=4), "x")}, LoopConfig(lr=1e-3), 10)
    first = save_checkpoint(tmp_path, trainer)
    trainer.step = 5
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Full)
    with pytest.raises(OSError) as error:
        save_checkpoint(tmp_path, trainer)
    assert str(error.value).startswith("Checkpoint step_00000005 needs about ")
    assert str(error.value).endswith(f"MB but only 0.0 MB is free at {tmp_path / 'checkpoints'}: the previous "
                                     f"checkpoint {first} is intact; free space in {tmp_path / 'checkpoints'} (or "
                                     "lower --keep-checkpoints) and run the same command again to resume.")
    assert list_checkpoints(tmp_path) == [first] and len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_the_feature_store_checks_its_room_first(ref, tmp_path, full_disk, capsys):
    run = copy_run(ref["run"], tmp_path / "run")
    rc, lines = cli(features_argv(run), capsys)
    assert rc == 1 and len(lines) == 1
    assert lines[0].startswith("saewb: error: The feature store needs about ")
    assert lines[0].endswith(f"MB but only 0.0 MB is free at {run / 'features'}: free space there or move the run "
                             f"folder {run} to a larger disk.")
    assert not (run / "features").exists()


def test_a_feature_store_write_that_fails_leaves_no_valid_store(ref, ref_features, tmp_path, monkeypatch, capsys):
    run = copy_run(ref["run"], tmp_path / "run")
    shutil.copytree(ref_features, run / "features")  # a valid store from before: it must not survive half-replaced
    assert FeatureStore(run / "features").d_sae > 0

    def no_space(tensors, path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(features, "save_file", no_space)
    rc, lines = cli(features_argv(run), capsys)
    folder = run / "features"
    assert rc == 1 and lines == [
        f"saewb: error: Could not write features.safetensors in {folder} (No space left on device: the disk is full "
        f"or a file-size limit was hit): no feature store is left in {folder} that reads as valid; free space and run "
        f"`saewb features {run}` again."]
    with pytest.raises(ValueError, match="No feature store"):
        FeatureStore(folder)
    assert not list(folder.glob(".*.tmp"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs mounted under tmp_path (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_cache_that_fills_a_real_disk_keeps_its_finished_shards(ref, small_tmpfs, monkeypatch, capsys):
    folder = small_tmpfs / "cache"
    monkeypatch.setattr(caching, "check_disk", lambda folder, needed: None)  # as if the estimate had been wrong
    rc, lines = cli(cache_argv(folder), capsys)
    assert rc == 1 and len(lines) == 1
    recorded = json.loads((folder / "progress.json").read_text())["shards"]
    assert 0 < len(recorded) < 32
    name = f"shard_{len(recorded):05d}.safetensors"
    assert lines[0] == (f"saewb: error: Could not write {name} in {folder} (No space left on device: the disk is full "
                        f"or a file-size limit was hit): the {len(recorded)} finished shard(s) are kept; free space in "
                        f"{folder} (or point SAEWB_CACHE / --out at a larger disk) and run the same command again to "
                        "continue.")
    assert not list(folder.glob(".*.tmp")) and not (folder / "manifest.json").exists()
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(folder)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)  # "free space"
    monkeypatch.undo()
    in_process(cache_argv(folder))
    assert shard_digests(folder) == shard_digests(ref["cache"])


def test_a_metrics_write_on_a_full_disk_names_the_file(tmp_path):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    from training.logger import RunLogger

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").symlink_to("/dev/full")
    logger = RunLogger({"sae": folder}, {}, wandb_mode="off")
    logger.log({"sae": {"step": 0, "loss": 1.0}}, 0)  # written to the file handle's buffer
    with pytest.raises(OSError) as caught:
        logger.flush()
    assert str(caught.value) == (
        f"Could not write metrics.jsonl in {folder} (No space left on device: the disk is full or a file-size limit "
        f"was hit): the last checkpoint is kept; free space in {folder} and run the same command again to resume "
        "from it.")
    assert caught.value.errno == errno.ENOSPC


def test_training_whose_metrics_file_cannot_be_written_says_so(ref, tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    rc, lines = cli(train_argv(ref["cache"], run), capsys)
    assert rc == 1 and len(lines) == 1
    assert lines[0].startswith(f"saewb: error: Could not write metrics.jsonl in {run} (No space left on device: ")
    assert not (run / "summary.json").exists() and not (run / "sae_weights.safetensors").exists()
