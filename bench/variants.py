"""Every registered SAE variant on the same data, in one table (markdown + JSON).

(a) Synthetic planted-dictionary data (training/synthetic.py): every variant trains on the same batches for the
    same steps; reported: held-out FVU, measured inference L0, dead % (never fired on held-out), planted-direction
    recovery (mean best |cosine|, fraction > 0.9) and training tokens/s.
(b) Cached activations of a model (default the tiny model; --model smollm2 for the embedded one), cached with
    gradients so the g-SAE trains too: all variants train in ONE multi-SAE pass on the same batches
    (training/run.py), and are evaluated on the held-out shard.
Compare at measured L0, not nominal k (algorithms.md §D.14): BatchTopK-style variants switch to a threshold at
inference, MP may stop early, JumpReLU and ReLU+L1 have no k at all.

    python -m bench.variants                  # about 3-5 minutes on 2 cores
"""
import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe_machine
from saes import ARCHITECTURES, build_sae
from training.synthetic import fraction_recovered, make_planted, mean_best_cosine, with_gradients
from training.trainer import LoopConfig, train_sae

# Per-variant options (the same ones the variant tests use); every other field keeps its default.
OPTIONS = {
    "jumprelu": {"threshold_init": 0.2, "bandwidth": 0.1, "sparsity_coef": 1.0},
    "relu_l1": {"sparsity_coef": 1.0},
    "batchtopk": {"threshold_start_step": 100, "threshold_decay": 0.99},
    "mutual_choice": {"threshold_start_step": 100, "threshold_decay": 0.99},
    "feature_choice": {"threshold_start_step": 100},
    "abstopk": {"selection": "per_token"},
}


def options_for(architecture: str, k: int) -> dict:
    fields = set(ARCHITECTURES[architecture].config_cls.__dataclass_fields__)
    base = {"k": k, "k_max": k, **OPTIONS.get(architecture, {})}
    return {key: value for key, value in base.items() if key in fields}


@torch.no_grad()
def held_out(sae, x: torch.Tensor) -> dict:
    codes = sae.encode(x)
    x_hat = sae.decode(codes)
    fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return {"fvu": fvu, "l0": (codes != 0).sum(-1).float().mean().item(),
            "dead_pct": 100 * (1 - (codes != 0).any(0).float().mean().item())}


def synthetic(args) -> list[dict]:
    planted = make_planted(d=args.d, n_true=args.n_true, mean_active=4, seed=3)
    # inputs scaled to E||x|| = sqrt(d), as the trainer's dataset_scalar does for real activations
    scale = args.d ** 0.5 / planted.sample(4096, torch.Generator().manual_seed(7)).norm(dim=-1).mean().item()
    test = planted.sample(8192, torch.Generator().manual_seed(11))
    rows = []
    for architecture in ARCHITECTURES:
        sae = build_sae(architecture, d_in=args.d, d_sae=args.expansion * args.n_true // 2, input_scale=scale,
                        **options_for(architecture, args.k))
        sae.init_b_dec(planted.sample(2048, torch.Generator().manual_seed(9)))
        batches = with_gradients(planted, args.batch) if sae.uses_grad else planted.batches(args.batch)
        started = time.perf_counter()
        train_sae(sae, batches, args.steps, LoopConfig(lr=4e-3, warmup_steps=30, dead_tokens=50_000), progress=False)
        seconds = time.perf_counter() - started
        rows.append({"data": "synthetic", "architecture": architecture, **held_out(sae, test),
                     "mean_best_cos": mean_best_cosine(sae.W_dec, planted.directions),
                     "frac_recovered": fraction_recovered(sae.W_dec, planted.directions),
                     "tokens_per_s": args.steps * args.batch / seconds})
    return rows


def cached(args) -> list[dict]:
    from training.caching import CacheConfig
    from training.run import TrainConfig, train

    hook = args.hook or ("blocks.15.hook_resid_post" if args.model == "smollm2" else "blocks.1.hook_resid_post")
    options = {}
    for architecture in ARCHITECTURES:
        options.update({k: str(v).lower() if isinstance(v, bool) else str(v)
                        for k, v in OPTIONS.get(architecture, {}).items()})
    options.pop("selection", None)  # mp's selection field differs from abstopk's: set per architecture below
    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheConfig(model=args.model, hooks=[hook], tokens=args.tokens, context_length=64,
                            shard_tokens=args.tokens // 8, gradients=True)
        cfg = TrainConfig(cache=cache, architectures=[a for a in ARCHITECTURES if a != "abstopk"], k=[args.k],
                          expansion=args.expansion, batch_size=args.batch, epochs=args.epochs, sae_options=options,
                          checkpoint_every=0, wandb="off", run_dir=Path(tmp) / "all",
                          loop=LoopConfig(lr=4e-3 if args.model == "tiny" else None, warmup_steps=30))
        summaries = train(cfg, progress=False)
        abs_cfg = TrainConfig(**{**cfg.__dict__, "architectures": ["abstopk"], "run_dir": Path(tmp) / "abs",
                                 "sae_options": {"selection": "per_token"}})
        summaries |= train(abs_cfg, progress=False)
    rows = []
    for summary in summaries.values():
        rows.append({"data": f"{args.model} {hook}", "architecture": summary["architecture"], "fvu": summary["fvu"],
                     "l0": summary["l0"], "dead_pct": 100 * summary["never_fired_frac"],
                     "mean_best_cos": None, "frac_recovered": None,
                     "tokens_per_s": summary["train_tokens"] / max(summary["this_sae_seconds"], 1e-9)})
    return rows


def markdown(rows: list[dict]) -> str:
    header = "| data | architecture | FVU | L0 | dead % | mean best cos | frac > 0.9 | tokens/s |\n|---|---|---|---|---|---|---|---|\n"
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    return header + "".join(
        f"| {r['data']} | {r['architecture']} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_pct']:.1f} | "
        f"{fmt(r['mean_best_cos'], '.3f')} | {fmt(r['frac_recovered'], '.2f')} | {r['tokens_per_s']:.0f} |\n"
        for r in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=32, help="synthetic input width")
    parser.add_argument("--n-true", type=int, default=96, help="planted directions")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=600, help="synthetic training steps")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--hook")
    parser.add_argument("--tokens", type=int, default=131_072, help="cached tokens (with gradients)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.d <= 128 else torch.get_num_threads())
    rows = synthetic(args) + cached(args)
    report = {"benchmark": "variants", "settings": vars(args) | {"out": str(args.out)}, "options": OPTIONS,
              "rows": rows, "machine": describe_machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(report, indent=2))
    notes = ("\nSettings: " + json.dumps(report["settings"]) + "\nPer-variant options: " + json.dumps(OPTIONS) +
             "\nL0 is measured at inference; compare variants at measured L0 (algorithms.md §D.14).\n")
    (args.out / "variants.md").write_text(markdown(rows) + notes)
    print(markdown(rows))
    assert all(math.isfinite(r["fvu"]) for r in rows)
    return report


if __name__ == "__main__":
    main()
