"""bench/variants.py on a very small setting (a few steps): one row per registered architecture, finite numbers on
both data sets, and the markdown table written. Keeps the benchmark from rotting when a variant is added."""
import json
import math

import torch

from bench import variants
from saes import ARCHITECTURES


def test_every_variant_runs_on_both_data_sets(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = variants.main([
            "--syn-steps", "3", "--model-steps", "3", "--syn-d", "16", "--syn-n-true", "32", "--syn-d-sae", "64",
            "--syn-k", "4", "--syn-eval-tokens", "1024", "--batch-size", "64", "--model", "tiny",
            "--cache-tokens", "2048", "--shard-tokens", "512", "--context-length", "64", "--model-k", "4",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "results"), "--quiet",
        ])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results" / "variants.json").read_text())
    assert saved["architectures"] == list(ARCHITECTURES) == report["architectures"]
    assert "cpu" in saved["machine"] and saved["settings"]["batch_size"] == 64
    for data, keys in (("synthetic", ("fvu", "l0", "dead_pct", "tokens_per_s", "mean_best_cosine", "frac_recovered")),
                       ("model", ("fvu", "l0", "dead_pct", "tokens_per_s"))):
        rows = saved[data]["rows"]
        assert sorted(rows) == sorted(ARCHITECTURES)
        for arch, row in rows.items():
            assert row["train_tokens"] == 3 * 64, (data, arch)
            for key in keys:
                assert isinstance(row[key], float) and math.isfinite(row[key]), (data, arch, key, row[key])
            assert row["l0"] > 0 and 0 <= row["dead_pct"] <= 100
    table = (tmp_path / "results" / "variants.md").read_text()
    assert all(f"| {arch} |" in table for arch in ARCHITECTURES)
