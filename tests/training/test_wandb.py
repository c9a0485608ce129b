"""W&B (offline): a resumed job continues its one run (one id, one folder: the earlier history replayed, the earlier
folder removed), its first throughput after the resume is counted from the resume (a fake clock, no wall time), the density histogram has no sentinel bin,
and `saewb eval --wandb offline` puts the report card into that same run."""
import dataclasses
import itertools
import json
import types

import pytest

from training.run import TrainConfig, train
from tests.training.test_trainer import interrupt_at_step_9
from training.trainer import LoopConfig
from training.wandb_offline import offline_runs, read_history

HOOK = "blocks.1.hook_resid_post"


def job(cache_cfg, run_dir) -> TrainConfig:
    return TrainConfig(cache=cache_cfg, hooks=[HOOK], k=[8], expansion=2, batch_size=256, epochs=2,
                       checkpoint_every=1024, wandb="offline", log_every=2, run_dir=run_dir,
                       loop=LoopConfig(lr=1e-3, warmup_steps=5))


def test_a_resumed_offline_run_is_one_run_and_receives_the_report_card(tiny_model, tiny_cache, tiny_cache_cfg,
                                                                       tmp_path, monkeypatch):
    from analysis.eval_compare import EvalConfig, run_eval

    cfg = job(tiny_cache_cfg, tmp_path / "run")
    interrupt_at_step_9(cfg, tiny_model, monkeypatch)
    run_id = (cfg.run_dir / "wandb_id.txt").read_text().strip()
    (first,) = offline_runs(cfg.run_dir)
    clock = itertools.count()  # the resumed run's loop clock: one fake second per reading (3 per step), no wall time
    monkeypatch.setattr("training.run.time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    summary = train(cfg, model=tiny_model, progress=False)["sae"]  # resumes from the checkpoint at step 8
    monkeypatch.undo()

    (resumed,) = offline_runs(cfg.run_dir)  # one folder: the first one was replayed into it, then removed
    assert resumed != first and not first.exists() and resumed.name == f"run-{run_id}.wandb"
    assert (cfg.run_dir / "wandb_id.txt").read_text().strip() == run_id
    config, history = read_history(resumed)
    assert config["k"] == [8]
    logged = [row["_step"] for row in history if "fvu" in row]
    expected = [s for s in range(1, summary["steps"] + 1) if s % 2 == 0 or s == summary["steps"]]
    assert logged == expected  # every W&B step once: before the resume (replayed) and after it
    densities = [row for row in history if "log10_feature_density/_type" in row]
    assert densities and all(min(row["log10_feature_density/bins"]) > -9 for row in densities)  # no -10 bin
    assert all(sum(row["log10_feature_density/values"]) + row["silent_latents"] == 2 * 64 for row in densities)

    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    # counted from the resume: 256 tokens over at least 3 fake seconds, not the 9 steps' tokens since step 0
    assert rows[8]["step"] == 8 and rows[8]["tokens_per_s"] <= cfg.batch_size / 3

    cards = run_eval(EvalConfig(runs=[cfg.run_dir], max_contexts=4, bootstrap=20, budget_curve=False,
                                stability=False, wandb="offline"), models={"tiny": tiny_model})
    (after_eval,) = offline_runs(cfg.run_dir)  # still one folder, same id
    assert after_eval.name == f"run-{run_id}.wandb"
    _, history = read_history(after_eval)
    assert [row["_step"] for row in history if "fvu" in row] == expected  # training history kept
    card = next(row for row in history if "card/core/fvu" in row)
    assert card["card/core/fvu"] == pytest.approx(cards[0]["core"]["fvu"])
    assert card["card/downstream/ce_loss_recovered"] == pytest.approx(cards[0]["downstream"]["ce_loss_recovered"])
    assert "card/core/fvu_low" in card and "card/saebench/kl_score_high" in card  # intervals too
    assert card["card/density_histogram/_type"] == "plotly-file"  # the card's figures


def test_offline_folders_include_those_wandb_suffixed_in_the_same_second(tmp_path):
    """A resume that starts in the same second as the run before it gets '-1' appended by wandb; it is the newest."""
    from training.logger import offline_folders

    names = ["offline-run-20261201_173423-abc", "offline-run-20261201_173421-abc-1", "offline-run-20261201_173421-abc",
             "offline-run-20261201_173421-abc-10", "offline-run-20261201_173421-abc-2", "offline-run-20261201_173421-abcd",
             "offline-run-20261201_173421-xabc", "run-20261201_173421-abc"]
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert [p.name for p in offline_folders(tmp_path, "abc")] == [
        "offline-run-20261201_173421-abc", "offline-run-20261201_173421-abc-1", "offline-run-20261201_173421-abc-2",
        "offline-run-20261201_173421-abc-10", "offline-run-20261201_173423-abc"]
