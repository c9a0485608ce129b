"""The variants benchmark keeps running: one row per registered architecture on both data sets."""
import math

from bench.variants import main
from saes import ARCHITECTURES


def test_variants_bench_small(tmp_path):
    report = main(["--steps", "20", "--tokens", "8192", "--epochs", "1", "--batch", "256", "--out", str(tmp_path)])
    for data in ("synthetic", "tiny blocks.1.hook_resid_post"):
        rows = [r for r in report["rows"] if r["data"] == data]
        assert sorted(r["architecture"] for r in rows) == sorted(ARCHITECTURES)
        assert all(math.isfinite(r["fvu"]) and r["l0"] >= 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "variants.md").read_text().count("\n| ") >= 2 * len(ARCHITECTURES)
