"""Head-level circuit discovery (O'Neill & Bui 2024; docs/methods.md §10.1) against an offline ground truth.

GPT-2's published IOI heads cannot be loaded here, so the ground truth is built on the model itself: exact
activation patching of every head (`analysis.circuit_heads.head_patching_effects`) on IOI prompts, clean vs ABC
corruption, and the heads with the largest |effect| form the circuit (the top `--truth-fraction`, default 10 %;
GPT-2 small's IOI circuit is 26 of 144 heads, 18 %). The SAE method then sees the same prompts (positives = clean,
negatives = corrupted), with one SAE trained per seed, and its node and edge rankings are scored by ROC-AUC and
best F1 against that set. A rank correlation with |effect| is reported too, as it does not depend on the cut.

    python -m bench.circuit_heads                 # embedded SmolLM2-135M (30 x 9 heads), a few minutes on 2 cores
    python -m bench.circuit_heads --model tiny    # seconds; the tiny model is random, so this only exercises it
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from analysis.circuit_heads import head_discovery, head_outputs, head_patching_effects  # noqa: E402
from analysis.tasks import build_task, evaluate_task, task_metric  # noqa: E402
from bench.machine import describe_machine  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        order = x.argsort()
        r = torch.empty_like(x, dtype=torch.float64)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in x.unique():  # average the ranks of ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-prompts", type=int, default=64, help="IOI prompts (each has its corrupted twin)")
    parser.add_argument("--truth-fraction", type=float, default=0.10, help="heads with the largest |effect| kept")
    parser.add_argument("--seeds", type=int, default=5, help="SAEs trained (one per seed)")
    parser.add_argument("--reduce", choices=["mean", "last"], default="mean", help="head outputs over positions")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/circuit_heads_<model>.json")
    args = parser.parse_args()
    from training.model import load_model

    torch.manual_seed(0)
    model = load_model(args.model)
    task = build_task("ioi", model.tokenizer, args.n_prompts, seed=0)
    report = evaluate_task(model, task)
    print(report["message"])
    start = time.perf_counter()
    effects, names = head_patching_effects(model, task.clean, task.patch, lambda logits: task_metric(logits, task))
    patch_seconds = time.perf_counter() - start
    n_truth = max(1, round(args.truth_fraction * len(names)))
    truth_idx = effects.abs().argsort(descending=True)[:n_truth]
    truth = {names[i] for i in truth_idx.tolist()}
    print(f"Ground truth: {n_truth} of {len(names)} heads by |patching effect| ({patch_seconds:.0f} s); top 5: "
          + ", ".join(f"{names[i]} {effects[i]:+.3f}" for i in truth_idx[:5].tolist()))

    outputs, head_names = head_outputs(model, torch.cat([task.clean, task.patch]), args.reduce)
    assert head_names == names
    positive = torch.arange(2 * len(task)) < len(task)
    trials = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        result = head_discovery(outputs, positive, names, truth=truth, seed=seed)
        trials.append({key: result[key] for key in ("roc_auc", "best_f1", "edge_roc_auc", "edge_best_f1")} |
                      {"node_spearman_abs_effect": spearman(torch.tensor(result["scores"]), effects.abs()),
                       "edge_spearman_abs_effect": spearman(torch.tensor(result["edge_head_scores"]), effects.abs())})
    sae_seconds = (time.perf_counter() - start) / args.seeds

    def summary(key: str) -> dict:
        values = [t[key] for t in trials]
        return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "values": values}

    out = {"model": args.model, "task": report, "n_heads": len(names), "n_truth": n_truth,
           "truth_fraction": args.truth_fraction, "reduce": args.reduce, "seeds": args.seeds,
           "truth": sorted(truth), "effects": dict(zip(names, effects.tolist())),
           "metrics": {key: summary(key) for key in trials[0]},
           "seconds": {"patching_all_heads": patch_seconds, "sae_method_per_seed": sae_seconds},
           "machine": describe_machine()}
    for key, value in out["metrics"].items():
        print(f"{key:>26}: {value['mean']:.3f} ± {value['std']:.3f} over {args.seeds} seeds")
    path = args.out or Path(f"bench/results/circuit_heads_{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
