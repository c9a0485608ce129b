"""Each command's life under faults, as real processes: a full disk, SIGKILL at seeded points, a second job at
once, a damaged checkpoint; then the same command again finishes, and what it leaves equals the uninterrupted run
(every shard's sha256; every weight and optimiser tensor and every metrics row; every feature tensor; every eval
number; eval intervals are a fixed-seed bootstrap, so they are equal too).

The steps of one command run in order in one test (each needs the state the previous one left), so the suite starts
each command as few times as it can."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from analysis.store import FeatureStore
from tests.faults.conftest import (CHECKPOINT_EVERY_STEPS, N_SHARDS, assert_same_state, assert_same_tensors,
                                   cache_argv, cli, copy_run, eval_argv, features_argv, finish, in_process, kill_point,
                                   kill_when, metrics_rows, normalised, saewb, shard_digests, start, train_argv,
                                   without_timing)
from training.activation_store import ActivationCache, CacheError, folder_lock
from training.checkpoint import STATE, list_checkpoints, load_checkpoint

KILLED = -signal.SIGKILL
SMALL_FILES = 64_000  # RLIMIT_FSIZE for "disk full": shards (~136 kB) and checkpoints (~200 kB) cannot be written


def wait_for_text(path, text: str, proc) -> bool:
    """Poll the child's log until it shows `text` (True) or the child exits (False)."""
    while proc.poll() is None:
        if text in path.read_text():
            return True
        time.sleep(0.01)
    return text in path.read_text()


def test_cache_under_disk_full_sigkill_and_a_second_writer(ref, tmp_path):
    folder, logs = tmp_path / "cache", tmp_path / "logs"

    # 1. The disk fills at the first shard: one sentence naming the folder; nothing that reads as a cache.
    r = saewb(cache_argv(folder), logs, fsize=SMALL_FILES)
    assert r.rc == 1, r.err
    assert r.last_line.startswith(f"saewb: error: Could not write shard_00000.safetensors in {folder} (")
    assert "the disk is full" in r.last_line and "run the same command again" in r.last_line
    assert not list(folder.glob("shard_*")) and not list(folder.glob(".*.tmp"))
    assert not (folder / "manifest.json").exists()
    with pytest.raises(CacheError, match="not a finished activation cache"):
        ActivationCache(folder)

    # 2. SIGKILL right after the a-th shard file is renamed into place, before progress.json records it.
    a = kill_point("cache: shard files written before the kill", 3, 20)
    r = saewb(cache_argv(folder), logs, failpoint=f"cache.shard_renamed:{a}")
    assert r.rc == KILLED, r.err
    assert len(list(folder.glob("shard_*.safetensors"))) == a
    assert len(json.loads((folder / "progress.json").read_text())["shards"]) == a - 1
    with pytest.raises(CacheError, match="incomplete: run the same `saewb cache` command again"):
        ActivationCache(folder)

    # 3. A second writer of the same cache waits for the first (here: this process holding the lock) and writes
    #    nothing meanwhile; once the lock is free it finishes the cache where the killed run stopped.
    before = (folder / "progress.json").read_text(), shard_digests(folder)
    with folder_lock(folder):
        proc = start(cache_argv(folder), logs)
        assert wait_for_text(proc.logs[1], "waiting for", proc), proc.logs[1].read_text()
        assert f"pid {os.getpid()}" in proc.logs[1].read_text()
        assert proc.poll() is None
        assert ((folder / "progress.json").read_text(), shard_digests(folder)) == before
    r = finish(proc)
    assert r.rc == 0, r.err

    # The result equals the uninterrupted cache, shard for shard.
    assert shard_digests(folder) == shard_digests(ref["cache"]) and len(shard_digests(folder)) == N_SHARDS
    ours, theirs = (json.loads((f / "manifest.json").read_text()) for f in (folder, ref["cache"]))
    for key in ("key_fields", "shards", "stats", "n_contexts"):
        assert ours[key] == theirs[key], key
    cache = ActivationCache(folder)
    for index in range(cache.n_shards):
        cache.read(index, "tokens")  # every checksum verified


def test_train_under_disk_full_sigkill_a_damaged_checkpoint_and_a_second_job(ref, tmp_path, capsys):
    run, logs, argv = tmp_path / "run", tmp_path / "logs", train_argv(ref["cache"], tmp_path / "run")

    # 1. The disk fills at the first checkpoint: one sentence naming the folder; no checkpoint, no SAE.
    r = saewb(argv, logs, fsize=SMALL_FILES)
    assert r.rc == 1, r.err
    assert r.last_line.startswith(f"saewb: error: Could not write step_{CHECKPOINT_EVERY_STEPS:08d} in "
                                  f"{run / 'checkpoints'} (")
    assert "the disk is full" in r.last_line and "no checkpoint was written yet" in r.last_line
    assert list_checkpoints(run) == [] and not list((run / "checkpoints").iterdir())
    assert not (run / "summary.json").exists() and not (run / "sae_weights.safetensors").exists()

    # 2. SIGKILL, watched from outside, once the checkpoint of step 4a exists.
    a = kill_point("train: checkpoints written before the kill", 3, 6)

    def newest_step() -> int:
        found = list_checkpoints(run)
        return int(found[-1].name.split("_")[1]) if found else -1

    r = kill_when(argv, logs, lambda: newest_step() >= CHECKPOINT_EVERY_STEPS * a)
    assert r.rc == KILLED, f"the job ended before the kill point: {r.err[-500:]}"
    assert not (run / "summary.json").exists()

    # 3. The newest checkpoint is damaged (truncated): the resumed job says so, resumes from the previous one, and is
    #    killed right after writing a complete checkpoint folder under its temporary name.
    damaged, previous = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    state = damaged / STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    r = saewb(argv, logs, failpoint="checkpoint.written:2")
    assert r.rc == KILLED, r.err
    (note,) = [line for line in r.errors if "resuming from" in line]
    assert f"Checkpoint {damaged}: {STATE} is truncated or corrupted" in note
    assert f"resuming from the previous one, {previous}" in note
    assert list((run / "checkpoints").glob(".step.tmp-*"))  # the half-made one, under its temporary name only

    # 4. Killed after the final SAE is written but before summary.json, the run's "done" mark.
    r = saewb(argv, logs, failpoint="train.before_summary")
    assert r.rc == KILLED, r.err
    assert (run / "sae_weights.safetensors").is_file() and not (run / "summary.json").exists()
    assert not list((run / "checkpoints").glob(".step.tmp-*"))  # the killed job's temporary folder is cleaned up

    # 5. A second `saewb train` into the folder while a job holds it is refused with one sentence, and touches
    #    nothing; a holder killed with SIGKILL leaves no stuck lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); f.truncate();"
        "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(600)"),
        str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    snapshot = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock")
    rc, lines = cli(argv, capsys)  # the command in this process (spares a start-up); the holder is another process
    assert rc == 1
    assert lines == [f"saewb: error: {run} is in use by another `saewb train` (pid {holder.pid}): wait for it "
                     "to finish, or pass another --run-dir."]
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock") == snapshot
    holder.kill()
    holder.wait(timeout=60)

    # 6. The same command finishes the job; everything equals the uninterrupted run.
    r = saewb(argv, logs)
    assert r.rc == 0, r.err
    reference = ref["run"]
    assert_same_tensors(run / "sae_weights.safetensors", reference / "sae_weights.safetensors")
    assert json.loads((run / "cfg.json").read_text()) == json.loads((reference / "cfg.json").read_text())
    ours, theirs = metrics_rows(run), metrics_rows(reference)
    summary, expected = (json.loads((f / "summary.json").read_text()) for f in (run, reference))
    assert without_timing(summary) == without_timing(expected)
    final, expected_final = list_checkpoints(run)[-1], list_checkpoints(reference)[-1]
    assert final.name == expected_final.name
    state, expected_state = load_checkpoint(final), load_checkpoint(expected_final)
    # The global RNG a process starts with is random (torch seeds it at start-up); SAE initialisation and batch order
    # use their own seeded generators, so it is no part of the result (and differs between two uninterrupted runs).
    state.pop("rng"), expected_state.pop("rng")
    assert_same_state(state, expected_state)
    assert [row["step"] for row in ours] == list(range(len(theirs)))
    assert [without_timing(row) for row in ours] == [without_timing(row) for row in theirs]


def test_features_under_sigkill_between_its_files(ref, ref_features, tmp_path):
    run, logs = copy_run(ref["run"], tmp_path / "runs" / "run"), tmp_path / "logs"

    # SIGKILL after features.safetensors is in place but before vocab.json and index.json: no valid store.
    r = saewb(features_argv(run), logs, failpoint="features.tensors_written")
    assert r.rc == KILLED, r.err
    assert (run / "features" / "features.safetensors").is_file()
    with pytest.raises(ValueError, match="saewb features"):
        FeatureStore(run / "features")

    in_process(features_argv(run))  # the same command again (in this process: it spares a model load)
    assert_same_tensors(run / "features" / "features.safetensors", ref_features / "features.safetensors")
    for name in ("index.json", "vocab.json"):
        assert json.loads((run / "features" / name).read_text()) == json.loads((ref_features / name).read_text())


def test_eval_under_sigkill_while_writing(ref, ref_eval, tmp_path):
    run, logs = copy_run(ref["run"], tmp_path / "runs" / "run"), tmp_path / "logs"
    out = tmp_path / "comparison"

    # SIGKILL as soon as the report card is on disk (figures and the comparison still being written).
    r = kill_when(eval_argv(run, out), logs, lambda: (run / "eval" / "metrics.json").is_file())
    assert r.rc == KILLED, f"eval ended before the kill point: {r.err[-500:]}"
    assert not (out / "report.html").exists()

    in_process(eval_argv(run, out))  # the same command again (in this process: it spares a model load)
    card = json.loads((run / "eval" / "metrics.json").read_text())
    expected = json.loads((ref_eval / "metrics.json").read_text())
    assert normalised(card, str(run), str(ref["run"])) == expected
    assert card["intervals"]["core"]["fvu"] == expected["intervals"]["core"]["fvu"]  # fixed-seed bootstrap
    ours = json.loads((out / "cards.json").read_text())
    theirs = json.loads((ref["eval_out"] / "cards.json").read_text())
    assert normalised(ours, str(run), str(ref["run"])) == theirs
    assert (out / "table.csv").read_text() == (ref["eval_out"] / "table.csv").read_text()
    for figure in (ref_eval / "figures").glob("*.json"):
        assert json.loads((run / "eval" / "figures" / figure.name).read_text()) == json.loads(figure.read_text())

