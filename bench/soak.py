"""Soak test of exact resume: train on the embedded model's cached activations (SmolLM2 blocks.15, the demo's cache:
reused when present) while a driver SIGKILLs the job at random (seeded) moments and starts the same command again,
until it finishes; then compare with one uninterrupted run of the same job.

Every kill waits until the job has written a checkpoint since it started (so each restart makes progress), then a
seeded random delay. Writes bench/results/soak.json: kills survived, wall time of both runs and the time lost to
restarts, the largest absolute difference over every final weight tensor (0.0 means bit-identical), and whether the
metrics rows and the final optimiser state match, with the machine described.

    python -m bench.soak                              # 5M tokens on SmolLM2's cache, a checkpoint every 500k
    python -m bench.soak --model tiny --tokens 1000000 --checkpoint-every 100000
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
HOOKS = {"smollm2": "blocks.15.hook_resid_post", "tiny": "blocks.1.hook_resid_post"}
SHARD_TOKENS = {"smollm2": 20_480, "tiny": 65_536}  # smollm2: as `make demo` caches, so its cache is reused
CACHE_TOKENS = {"smollm2": 204_800, "tiny": 524_288}
TIMING = ("tokens_per_s", "data_s", "sae_s")


def child_env(threads: int) -> dict:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def saewb(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def cache_args(args, out: Path | None) -> list[str]:
    """The cache's arguments; `out` None: the content-addressed default folder (shared with `make demo`)."""
    return ["--model", args.model, "--hooks", HOOKS[args.model], "--tokens", str(args.cache_tokens),
            "--context-length", "128", "--shard-tokens", str(SHARD_TOKENS[args.model]), "--dtype", "float32",
            *(["--out", str(out)] if out is not None else [])]


def train_args(args, cache: Path | None, run_dir: Path) -> list[str]:
    cache_part = [("--cache." + a[2:]) if a.startswith("--") else a for a in cache_args(args, cache)]
    # enough passes over the training shards (one is held out); --max-steps stops at --tokens
    epochs = -(-args.tokens // int(0.8 * args.cache_tokens)) + 1
    return ["train", *cache_part, "--k", "16", "--expansion", "8", "--batch-size", str(args.batch_size),
            "--epochs", str(epochs), "--max-steps", str(args.tokens // args.batch_size), "--holdout-shards", "1",
            "--checkpoint-every", str(args.checkpoint_every), "--wandb", "off", "--seed", str(args.seed),
            "--run-dir", str(run_dir)]


def newest_step(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    steps = [int(p.name.split("_")[1]) for p in root.glob("step_*")] if root.is_dir() else []
    return max(steps, default=-1)


def run_once(command: list[str], env: dict, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=handle)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def run_with_kills(command: list[str], env: dict, run_dir: Path, log: Path, rng: random.Random, low: float,
                   high: float) -> dict:
    """Start, kill at random moments, restart, until the job exits 0."""
    kills, delays, started = [], [], time.perf_counter()
    while True:
        delay = rng.uniform(low, high)
        at_start = newest_step(run_dir)
        began = time.perf_counter()
        with open(log, "a") as handle:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=handle)
            while proc.poll() is None:
                if time.perf_counter() - began >= delay and newest_step(run_dir) > at_start:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills.append({"after_s": round(time.perf_counter() - began, 2), "newest_checkpoint_step":
                                  newest_step(run_dir)})
                    delays.append(round(delay, 2))
                    break
                time.sleep(0.05)
        if proc.returncode == 0:
            break
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the job failed (exit {proc.returncode}) after {len(kills)} kill(s); see {log}")
    return {"wall_s": time.perf_counter() - started, "kills": kills, "drawn_delays_s": delays}


def compare(a: Path, b: Path) -> dict:
    wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa) if sorted(wa) == sorted(wb) else float("inf")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (a, b)]
    states = []
    for folder in (a, b):
        newest = sorted((folder / "checkpoints").glob("step_*"))[-1]
        states.append(torch.load(newest / "trainer_state.pt", map_location="cpu", weights_only=True))
    optim_equal = all(torch.equal(x, y) for x, y in zip(
        [t for s in states[0]["saes"]["sae"]["optimizer"]["state"].values() for t in s.values()
         if isinstance(t, torch.Tensor)],
        [t for s in states[1]["saes"]["sae"]["optimizer"]["state"].values() for t in s.values()
         if isinstance(t, torch.Tensor)]))
    return {"max_abs_weight_difference": diff, "weight_tensors": sorted(wa), "metrics_rows_equal": rows[0] == rows[1],
            "metrics_rows": len(rows[0]), "final_optimizer_state_equal": optim_equal,
            "final_step": states[0]["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=5_000_000, help="tokens to train on")
    parser.add_argument("--checkpoint-every", type=int, default=500_000, help="tokens between checkpoints")
    parser.add_argument("--model", default="smollm2", choices=sorted(HOOKS), help="smollm2 (embedded) or tiny")
    parser.add_argument("--cache-tokens", type=int, help="tokens cached, trained over in epochs (default: 204,800 "
                                                         "for smollm2, the demo's cache; 524,288 for tiny)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays (and the job)")
    parser.add_argument("--kill-after", type=float, nargs=2, default=(4.0, 15.0), metavar=("LOW", "HIGH"),
                        help="each kill comes a uniform random LOW..HIGH s after a start (and after a new checkpoint)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the jobs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    args.cache_tokens = args.cache_tokens or CACHE_TOKENS[args.model]

    work = args.work or Path(tempfile.mkdtemp(prefix="saewb-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    env, log = child_env(args.threads), work / "soak.log"
    cache = work / "cache" if args.model == "tiny" else None
    print(f"soak: caching {args.cache_tokens} tokens of {args.model} (or finding them cached)")
    run_once(saewb(["cache", *cache_args(args, cache)]), env, log)
    reference, soaked = work / "uninterrupted", work / "killed"
    for folder in (reference, soaked):
        shutil.rmtree(folder, ignore_errors=True)
    print(f"soak: uninterrupted run of {args.tokens} tokens")
    reference_s = run_once(saewb(train_args(args, cache, reference)), env, log)
    print(f"soak: the same job under SIGKILL every {args.kill_after[0]}-{args.kill_after[1]} s (seed {args.seed})")
    killed = run_with_kills(saewb(train_args(args, cache, soaked)), env, soaked, log, random.Random(args.seed),
                            *args.kill_after)
    result = {
        "benchmark": "soak", "model": args.model, "hook": HOOKS[args.model], "architecture": "topk", "k": 16, "expansion": 8,
        "tokens": args.tokens, "batch_size": args.batch_size, "checkpoint_every_tokens": args.checkpoint_every,
        "cache_tokens": args.cache_tokens, "seed": args.seed, "kill_after_s": list(args.kill_after),
        "kills_survived": len(killed["kills"]), "restarts": len(killed["kills"]), "kills": killed["kills"],
        "uninterrupted_wall_s": round(reference_s, 2), "killed_wall_s": round(killed["wall_s"], 2),
        "time_lost_to_restarts_s": round(killed["wall_s"] - reference_s, 2),
        "time_lost_per_restart_s": round((killed["wall_s"] - reference_s) / max(len(killed["kills"]), 1), 2),
        **compare(soaked, reference),
        "note": "time lost = killed-run wall time minus the uninterrupted run's: each restart pays start-up (imports, "
                "cache check), the steps since the last checkpoint, and skipping the batches already trained on.",
        "machine": describe_machine() | {"job_threads": args.threads},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("kills", "machine", "weight_tensors")}, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
