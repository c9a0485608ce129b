"""bench/peers.py on a tiny setting (d=16, d_sae=64, k=4, 12 steps of 256): the data file, our trainer and the plain
loop in their own processes, the shared evaluation, the JSON schema and the markdown table. SAELens and sparsify
rows run only when their venvs already exist (tests/saes/test_saelens_compat.py and test_sparsify_compat.py build
them); they are never built here."""
import json
import math
import os
import threading

import pytest
import torch
from safetensors import safe_open

from bench import peers
from training.synthetic import make_planted

TINY = ["--d", "16", "--n", "64", "--k", "4", "--batch", "256", "--tokens", str(12 * 256), "--heldout", "1024",
        "--timing-warmup", "2", "--repeats", "3", "--threads", "1", "--quiet"]
ROW_KEYS = {"library", "version", "runs", "tokens_per_s", "tokens_per_s_windows", "window_steps", "tokens_per_cpu_s",
            "tokens_per_s_all_steps", "train_steps", "train_tokens", "fvu", "l0", "dead_pct", "mean_best_cosine",
            "frac_recovered", "peak_rss_mib", "rss_before_training_mib", "own_vs_shared_recon_max_abs_diff",
            "details", "idle", "ratio_to_sparsify"}


def test_recovery_is_one_for_the_planted_dictionary_and_low_for_a_random_one():
    # d=128: in d=16 the best of 64 random directions already has |cos| ~ 0.6 with any given one
    planted = make_planted(d=128, n_true=64, mean_active=4, seed=0)
    x = planted.sample(2048, torch.Generator().manual_seed(1))
    extra = torch.nn.functional.normalize(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)), dim=-1)

    def sae(W_dec):
        return {"W_enc": W_dec.clone(), "b_enc": torch.zeros(len(W_dec)), "W_dec": W_dec, "b_dec": torch.zeros(128)}

    exact = peers.evaluate_weights(sae(planted.directions.clone()), True, 8, x, planted.directions)
    assert exact["mean_best_cosine"] == pytest.approx(1.0, abs=1e-5) and exact["frac_recovered"] == 1.0
    assert 0 <= exact["fvu"] < 0.2 and 0 <= exact["dead_pct"] <= 100 and exact["l0"] <= 8
    padded = peers.evaluate_weights(sae(torch.cat([extra, planted.directions])), True, 8, x, planted.directions)
    assert padded["mean_best_cosine"] == pytest.approx(1.0, abs=1e-5) and padded["frac_recovered"] == 1.0
    scaled = peers.evaluate_weights(sae(-3.0 * planted.directions), True, 8, x, planted.directions)
    assert scaled["mean_best_cosine"] == pytest.approx(1.0, abs=1e-5)  # |cos|, any row norm
    random = peers.evaluate_weights(sae(extra), True, 8, x, planted.directions)
    assert random["mean_best_cosine"] < 0.5 and random["frac_recovered"] == 0.0


def test_driver_end_to_end_on_a_tiny_config(tmp_path):
    rows = ["saewb", "plain"] + [row for row in ("saelens", "sparsify") if peers.interpreter(row)[0] is not None]
    threads = torch.get_num_threads()
    try:  # in turns of 4 steps: each row yields 3 times besides its first step
        report = peers.main(TINY + ["--rows", ",".join(rows), "--work-dir", str(tmp_path / "work"),
                                    "--turn-steps", "4", "--out", str(tmp_path / "results" / "peers.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results" / "peers.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["benchmark"] == "peers" and "3,072 training tokens" in saved["label"]
    s = saved["settings"]
    assert (s["d"], s["n"], s["k"], s["batch"], s["steps"], s["train_tokens"]) == (16, 64, 4, 256, 12, 3072)
    assert s["lr"] == pytest.approx(2e-4 / math.sqrt(64 / 2**14)) and s["lr_warmup"] == 1
    assert s["timing"]["repeats"] == 3 and s["timing"]["rows"] == "in turns of 4 steps" and "cpu" in saved["machine"]
    for when in ("start", "end"):
        assert len(saved["idle_check"][when]["loadavg"]) == 3 and saved["idle_check"][when]["matmul_gflops"] > 0
    assert list(saved["rows"]) == rows

    # the data file: a valid safetensors file (read by safetensors itself) holding the planted dictionary
    data_file = s["data"]["file"]
    with safe_open(data_file, framework="pt") as handle:
        assert handle.get_slice("train").get_shape() == [3072, 16]
        assert handle.get_slice("heldout").get_shape() == [1024, 16]
        planted = make_planted(d=16, n_true=32, mean_active=s["data"]["mean_active"], seed=0)
        assert torch.equal(handle.get_tensor("directions"), planted.directions)
        first = next(planted.batches(256, seed=1))
        assert torch.equal(handle.get_tensor("train")[:256], first)  # batch 0 of the stream, in order
    assert peers.DataFile(data_file).rows("train", 256, 256).equal(peers.DataFile(data_file).all("train")[256:512])

    for name, row in saved["rows"].items():
        assert row["status"] == "ok", (name, row)
        assert ROW_KEYS <= set(row), (name, ROW_KEYS - set(row))
        assert row["train_steps"] == 12 and row["train_tokens"] == 3072 and row["window_steps"] == 3
        assert len(row["tokens_per_s_windows"]) == 3 and row["tokens_per_s"] == sorted(row["tokens_per_s_windows"])[1]
        assert row["tokens_per_cpu_s"] > 0 and len(row["tokens_per_cpu_s_windows"]) == 3
        for key in ("fvu", "l0", "dead_pct", "mean_best_cosine", "frac_recovered", "peak_rss_mib"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key)
        assert 0 < row["l0"] <= 4 and 0 <= row["dead_pct"] <= 100 and 0 <= row["frac_recovered"] <= 1
        assert 0 < row["mean_best_cosine"] <= 1 and row["peak_rss_mib"] > 50
        assert row["own_vs_shared_recon_max_abs_diff"] < 1e-3 * max(row["own_recon_scale"], 1.0), name
        idle = row["idle"]
        assert {"before", "after", "wall_s", "child_cpu_s", "others_cores"} <= set(idle) and idle["child_cpu_s"] > 0
        assert idle["in_turns_with"] == rows and idle["turn_steps"] == 4
        if "sparsify" in saved["rows"]:
            assert row["ratio_to_sparsify"]["tokens_per_s"] > 0
        else:
            assert row["ratio_to_sparsify"] is None
    ours = saved["rows"]["saewb"]
    assert ours["details"]["kernel"] in ("sparse", "dense") and ours["details"]["loop"]["lr"] == s["lr"]
    assert ours["mean_best_cosine"] > 0.8  # 12 steps are enough in d=16
    table = (tmp_path / "results" / "peers.md").read_text()
    assert "Token budget: 3,072 training tokens" in table and "Load average at start" in table
    assert all(f"| {name} |" in table for name in rows)

    # --reuse: finished rows are evaluated again from their saved weights, not retrained
    again = peers.main(TINY + ["--rows", ",".join(rows), "--work-dir", str(tmp_path / "work"), "--reuse",
                               "--out", str(tmp_path / "again" / "peers.json")])
    for name, row in again["rows"].items():
        assert row["reused"] and row["fvu"] == saved["rows"][name]["fvu"]
        assert row["tokens_per_s"] == saved["rows"][name]["tokens_per_s"]

    # --turn-steps 0: one row after the other, each with its own idle check
    apart = peers.main(TINY + ["--rows", "plain", "--work-dir", str(tmp_path / "apart"), "--turn-steps", "0",
                               "--out", str(tmp_path / "apart" / "peers.json")])
    assert apart["settings"]["timing"]["rows"] == "one after another"
    assert apart["rows"]["plain"]["status"] == "ok" and "in_turns_with" not in apart["rows"]["plain"]["idle"]


def test_missing_peer_venv_is_a_skipped_row(tmp_path, monkeypatch):
    monkeypatch.setitem(peers.VENVS, "saelens", tmp_path / "no-such-venv")
    python, reason = peers.interpreter("saelens")
    assert python is None and "does not exist" in reason
    prepared = peers.prepare_row("saelens", peers.parse_args(TINY), tmp_path / "unused.safetensors", tmp_path)
    assert prepared == {"report": {"status": "skipped", "reason": reason}}


def test_turns_wait_for_the_driver_and_leave_the_wait_out_of_the_clock():
    """A worker in turns of 3 steps yields at its first step (ready) and at steps 3 and 6; the driver's delay before
    giving the turn back (100 s on a fake clock) is not in the timestamps, the steps' own second each is."""
    now = [0.0]
    worker_reads, driver_writes = os.pipe()
    driver_reads, worker_writes = os.pipe()
    yields = []

    def driver():
        while os.read(driver_reads, 1) == b"y":
            yields.append(now[0])
            now[0] += 100.0
            os.write(driver_writes, b"g")

    thread = threading.Thread(target=driver)
    thread.start()
    turns = peers.Turns(3, (worker_reads, worker_writes), clock=lambda: now[0])
    stamps = []
    for _ in range(7):
        stamps.append(turns.step_start())
        now[0] += 1.0  # the step
    os.close(worker_writes)  # the worker exits: the driver reads the end of the pipe
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert stamps == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert yields == [0.0, 103.0, 206.0]  # before steps 0, 3 and 6 on the real (fake) clock
    for fd in (worker_reads, driver_writes, driver_reads):
        os.close(fd)
    plain = peers.Turns(clock=lambda: 42.0)  # not in turns: the clock as it is, nothing waits
    assert plain.step_start() == 42.0 and plain.step_start() == 42.0


def test_a_worker_that_never_gets_its_turn_back_stops(tmp_path):
    """The driver gone (its end of the pipe closed) is a clear exit, not a hang."""
    worker_reads, driver_writes = os.pipe()
    driver_reads, worker_writes = os.pipe()
    os.close(driver_writes)
    turns = peers.Turns(3, (worker_reads, worker_writes))
    with pytest.raises(SystemExit, match="driver went away"):
        turns.step_start()
    for fd in (worker_reads, driver_reads, worker_writes):
        os.close(fd)


def test_timing_windows():
    times = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0, 10.0]  # 8 steps; after 1 warm-up step: windows of 2 steps
    width, rates = peers.windows(times, batch=10, warmup=1, repeats=3)
    assert width == 2 and rates == [20 / 2.0, 20 / 4.0, 20 / 3.0]
    with pytest.raises(ValueError, match="raise --tokens"):
        peers.windows(times[:3], batch=10, warmup=1, repeats=3)
