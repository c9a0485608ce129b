"""A training job end to end: make sure the cache exists, train one SAE on it, evaluate on held-out shards,
and leave a run folder: config.json (the whole job config), cfg.json + sae_weights.safetensors (SAELens layout),
metrics.jsonl (one line per logged step) and summary.json (held-out FVU, L0, dead fraction).
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saes import build_sae, load_sae, sae_class, save_sae
from saes.base import SAE
from training.activation_store import ActivationCache
from training.caching import CacheConfig, cache_activations
from training.trainer import LoopConfig, train_sae


@dataclass
class TrainConfig:
    """Train an SAE on cached activations (the cache is created first when missing)."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """Which activations to train on."""
    hook: str | None = None
    """Hook to train on; default the first of --cache.hooks."""
    architecture: str = "topk"
    """SAE variant (see `saewb train --help` for the registered names)."""
    expansion: int = 4
    """d_sae = expansion x d_in."""
    k: int = 32
    """Active latents per token (variants that have a budget)."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    epochs: int = 1
    """Passes over the training shards."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Optimiser and schedule."""
    input_norm: str = "dataset_scalar"
    """'dataset_scalar' trains on sqrt(d)/E||x|| * x and folds the scalar on save (algorithms.md §1.1), or 'none'."""
    holdout_shards: int = 1
    """Shards kept out of training and used to report FVU and L0 (0 evaluates on training data)."""
    seed: int = 0
    """Seeds initialisation and batch order."""
    run_dir: Path = Path("runs/demo")
    """Run folder to write."""

    def validate(self) -> None:
        sae_class(self.architecture)  # unknown names list the registered ones
        if self.expansion <= 0 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError("--expansion, --batch-size and --epochs must be positive.")
        if self.input_norm not in ("dataset_scalar", "none"):
            raise ValueError(f"--input-norm must be dataset_scalar or none, got {self.input_norm!r}.")
        if self.hook is not None and self.hook not in self.cache.hooks:
            raise ValueError(f"--hook {self.hook!r} is not among --cache.hooks {self.cache.hooks}: add it there.")


def config_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def split_shards(cache: ActivationCache, holdout: int) -> tuple[list[int], list[int], bool]:
    """Training shards, evaluation shards (the last `holdout` ones), and whether evaluation is held out.
    A single-shard cache is evaluated on its training data, and the summary says so."""
    n = cache.n_shards
    holdout = min(holdout, n - 1)
    if holdout <= 0:
        return list(range(n)), list(range(n)), False
    return list(range(n - holdout)), list(range(n - holdout, n)), True


@torch.no_grad()
def evaluate(sae: SAE, cache: ActivationCache, hook: str, shards: list[int]) -> dict:
    """Pooled FVU, mean L0 and the fraction of latents that never fired on the given shards (special and
    outlier tokens excluded)."""
    sq_err, n, total, sq_sum, l0_sum = 0.0, 0, torch.zeros(cache.d_in(hook), dtype=torch.float64), 0.0, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for index in shards:
        x = cache.shard_tokens(index, hook)
        for chunk in x.split(4096):
            codes = sae.encode(chunk)
            x_hat = sae.decode(codes)
            sq_err += (chunk - x_hat).double().pow(2).sum().item()
            total += chunk.double().sum(0)
            sq_sum += chunk.double().pow(2).sum().item()
            l0_sum += (codes != 0).sum().item()
            fired |= (codes != 0).any(0)
            n += len(chunk)
    variance = sq_sum - (total.pow(2).sum().item() / n)  # sum ||x - mean||^2
    return {"fvu": sq_err / variance, "l0": l0_sum / n, "never_fired_frac": 1 - fired.float().mean().item(),
            "eval_tokens": n}


def train(cfg: TrainConfig, model=None, progress: bool = True) -> dict:
    """Run the job; returns the summary. Skips training when the run folder already holds this exact job."""
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    config = config_json(cfg)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and (run_dir / "config.json").is_file():
        if json.loads((run_dir / "config.json").read_text()) == config:
            summary = json.loads(summary_path.read_text())
            summary["skipped"] = True
            return summary
    cache_dir = cache_activations(cfg.cache, model=model, progress=progress)
    cache = ActivationCache(cache_dir)
    hook = cfg.hook or cfg.cache.hooks[0]
    d_in = cache.d_in(hook)
    fields = {"d_in": d_in, "d_sae": cfg.expansion * d_in, "hook_name": hook, "model_name": cfg.cache.model,
              "input_scale": cache.stats(hook)["dataset_scalar"] if cfg.input_norm == "dataset_scalar" else 1.0,
              "k": cfg.k, "metadata": {"cache_key": cache.manifest["key"], "context_length": cache.context_length}}
    config_names = {f.name for f in dataclasses.fields(sae_class(cfg.architecture).config_cls)}
    sae = build_sae(cfg.architecture, seed=cfg.seed, **{k: v for k, v in fields.items() if k in config_names})
    train_ids, eval_ids, held_out_eval = split_shards(cache, cfg.holdout_shards)
    sae.init_b_dec(cache.shard_tokens(train_ids[0], hook)[:4096])
    n_train = sum(cache.keep_mask(i, hook).sum().item() for i in train_ids)
    steps = max(1, (n_train * cfg.epochs) // cfg.batch_size)
    batches = cache.batches(hook, cfg.batch_size, seed=cfg.seed, shards=train_ids, epochs=cfg.epochs,
                            grads=sae.uses_grad)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    summary_path.unlink(missing_ok=True)
    started = time.time()
    with open(run_dir / "metrics.jsonl", "w") as metrics_file:
        def log(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")

        history = train_sae(sae, batches, steps, cfg.loop, progress=progress, on_step=log)
    seconds = time.time() - started
    save_sae(sae, run_dir)
    held_out = evaluate(load_sae(run_dir), cache, hook, eval_ids)
    summary = {"architecture": cfg.architecture, "hook": hook, "d_in": d_in, "d_sae": sae.cfg.d_sae,
               "steps": len(history), "train_tokens": len(history) * cfg.batch_size,
               "train_seconds": round(seconds, 2), "tokens_per_second": round(len(history) * cfg.batch_size / seconds),
               "final_train_fvu": history[-1]["fvu"] if history else math.nan, **held_out,
               "eval_split": "held-out shards" if held_out_eval else "training data (single-shard cache)",
               "cache": str(cache_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
