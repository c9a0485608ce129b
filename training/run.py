"""A training job end to end: validate, make sure the data exists, train one or several SAEs on the same batches
with checkpoints and exact resume, evaluate on held-out shards, and leave run folders.

One SAE: `run_dir/` is its run folder. Several (the product of --architectures, --k and --hooks): each gets
`run_dir/<name>/`. A run folder holds config.json (the whole job config), cfg.json + sae_weights.safetensors
(SAELens layout), metrics.jsonl (one line per step) and summary.json; checkpoints live in `run_dir/checkpoints/`.
"""
import dataclasses
import itertools
from itertools import islice
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from saes import ARCHITECTURES, build_sae, load_sae, sae_class, save_sae
from saes.base import SAE
from saes.thresholds import ThresholdCalibrator
from training import distributed as dist
from training.activation_store import (LOCK, ActivationCache, failpoint, folder_lock, require_free, write_error,
                                       write_json_atomic)
from training.caching import CacheConfig, cache_activations
from training.checkpoint import (estimate_bytes, latest_checkpoint, list_checkpoints, remove_partial,
                                 resume_checkpoint, save_checkpoint)
from training.loaders import cache_batches, model_batches
from training.logger import WANDB_MODES, RunLogger, read_wandb_id
from training.trainer import LoopConfig, NonFiniteLossError, Trainer, to_host


@dataclass
class TrainConfig:
    """Train SAEs on a model's activations: one, or a sweep trained on the same batches with the data read once."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """Which activations (model, hooks, corpus, tokens); cached first when missing."""
    source: Literal["cache", "model"] = "cache"
    """'cache' trains from the activation cache; 'model' computes activations on the fly (nothing stored)."""
    hooks: list[str] = field(default_factory=list)
    """Hooks to train SAEs on; default the first of --cache.hooks."""
    architectures: list[str] = field(default_factory=lambda: ["topk"])
    """SAE variants, e.g. topk batchtopk jumprelu (one SAE per architecture x k x hook)."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active latents per token, one or several values (ignored by variants without k)."""
    expansion: int = 4
    """d_sae = expansion x d_in."""
    sae_options: dict[str, str] = field(default_factory=dict)
    """Extra config fields given to every SAE that has them, e.g. --sae-options beta 0.5 sparsity_coef 1.0."""
    batch_size: int = 4096
    """Tokens per optimiser step (over all ranks when distributed)."""
    epochs: int = 1
    """Passes over the training shards (cache source)."""
    max_steps: int | None = None
    """Stop after this many steps (default: the whole data)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Optimiser, schedules and precision."""
    input_norm: Literal["dataset_scalar", "none"] = "dataset_scalar"
    """'dataset_scalar' trains on sqrt(d)/E||x|| * x and folds the scalar on save (docs/methods.md §1.1)."""
    holdout_shards: int = 1
    """Last shards kept out of training to report FVU and L0 (0 evaluates on training data)."""
    checkpoint_every: int = 5_000_000
    """Write a checkpoint every this many tokens (and always at the end); 0 only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    wandb: str = "offline"
    """Weights & Biases: 'offline' (default; upload later with `wandb sync`), 'online' (needs `wandb login`), 'off'."""
    wandb_project: str = "saewb"
    """W&B project name."""
    log_every: int = 10
    """Steps between W&B logs (metrics.jsonl gets every step)."""
    seed: int = 0
    """Seeds initialisation and batch order."""
    run_dir: Path = Path("runs/demo")
    """Run folder to write."""
    overwrite: bool = False
    """Replace a run folder that holds a different job (otherwise that is an error)."""

    def validate(self) -> None:
        """Checked before any model loads."""
        try:
            self.cache.validate()  # first: it also fills in the default hook the checks below compare against
        except ValueError as error:  # the cache's own flags are --cache.* here
            raise ValueError(re.sub(r"(?<![\w.-])--(?!cache\.)(?=[a-z])", "--cache.", str(error))) from None
        for name in self.architectures:
            if name not in ARCHITECTURES and sae_class(name):  # unknown names list the registered ones
                raise ValueError(f"--architectures {name}: this architecture is inference-only (it loads other "
                                 f"libraries' SAEs); trainable ones: {' '.join(sorted(ARCHITECTURES))}.")
        if not self.architectures or not self.k:
            raise ValueError("--architectures and --k need at least one value each.")
        if any(k <= 0 for k in self.k):
            raise ValueError(f"--k values must be positive, got {self.k}.")
        if self.expansion <= 0 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError("--expansion, --batch-size and --epochs must be positive.")
        known = {f.name for name in self.architectures for f in dataclasses.fields(sae_class(name).config_cls)}
        unknown = sorted(set(self.sae_options) - known)
        if unknown:  # e.g. the removed threshold_decay: silently ignoring it would train something else than asked
            raise ValueError(f"--sae-options {', '.join(unknown)}: no SAE of --architectures "
                             f"{' '.join(self.architectures)} has such a field; its fields: {', '.join(sorted(known))}.")
        missing = [h for h in self.hooks if h not in self.cache.hooks]
        if missing:
            raise ValueError(f"--hooks {missing} are not among --cache.hooks {self.cache.hooks}: add them there.")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {self.wandb!r}.")
        if self.batch_size % dist.world_size():
            raise ValueError(f"--batch-size {self.batch_size} must divide evenly over {dist.world_size()} ranks.")
        self.loop.validate()

    @property
    def train_hooks(self) -> list[str]:
        return self.hooks or self.cache.hooks[:1]

    def specs(self) -> list[dict]:
        """One entry per SAE of the job, with a readable unique name."""
        combos = list(itertools.product(self.architectures, self.k, self.train_hooks))
        specs = []
        for architecture, k, hook in combos:
            name = f"{architecture}-k{k}-{hook.replace('.', '_')}" if len(combos) > 1 else "sae"
            specs.append({"name": name, "architecture": architecture, "k": k, "hook": hook})
        return specs


def config_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_option(value: str):
    """CLI option strings become JSON values where they parse (numbers, booleans, lists)."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def build_job_sae(cfg: TrainConfig, spec: dict, d_in: int, input_scale: float, metadata: dict) -> SAE:
    config_cls = sae_class(spec["architecture"]).config_cls
    names = {f.name for f in dataclasses.fields(config_cls)}
    fields = {"d_in": d_in, "d_sae": cfg.expansion * d_in, "hook_name": spec["hook"], "model_name": cfg.cache.model,
              "input_scale": input_scale if cfg.input_norm == "dataset_scalar" else 1.0, "k": spec["k"],
              "k_max": spec["k"], "metadata": metadata,
              **{k: parse_option(v) for k, v in cfg.sae_options.items()}}
    return build_sae(spec["architecture"], seed=cfg.seed, **{k: v for k, v in fields.items() if k in names})


def split_shards(cache: ActivationCache, holdout: int) -> tuple[list[int], list[int], bool]:
    """Training shards, evaluation shards (the last `holdout`), and whether evaluation is held out."""
    n = cache.n_shards
    holdout = min(holdout, n - 1)
    if holdout <= 0:
        return list(range(n)), list(range(n)), False
    return list(range(n - holdout)), list(range(n - holdout, n)), True


@torch.no_grad()
def evaluate(sae: SAE, cache: ActivationCache, hook: str, shards: list[int]) -> dict:
    """Pooled FVU, mean L0 and the fraction of latents that never fired (special and outlier tokens excluded)."""
    sq_err, n, total, sq_sum, l0_sum = 0.0, 0, torch.zeros(cache.d_in(hook), dtype=torch.float64), 0.0, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for index in shards:
        for chunk in cache.shard_tokens(index, hook).split(4096):
            codes = sae.encode(chunk)
            x_hat = sae.decode(codes)
            sq_err += (chunk - x_hat).double().pow(2).sum().item()
            total += chunk.double().sum(0)
            sq_sum += chunk.double().pow(2).sum().item()
            l0_sum += (codes != 0).sum().item()
            fired |= (codes != 0).any(0)
            n += len(chunk)
    variance = sq_sum - total.pow(2).sum().item() / n  # sum ||x - mean||^2
    return {"fvu": sq_err / variance, "l0": l0_sum / n, "never_fired_frac": 1 - fired.float().mean().item(),
            "eval_tokens": n}


def sae_folders(cfg: TrainConfig) -> dict[str, Path]:
    specs = cfg.specs()
    return {s["name"]: (cfg.run_dir if len(specs) == 1 else cfg.run_dir / s["name"]) for s in specs}


def prepare_run_dir(cfg: TrainConfig, config: dict) -> str:
    """'done' (same job finished), 'resume' (same job, a checkpoint exists) or 'fresh'."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.json"
    if saved.is_file() and (found := read_run_json(saved)) != config:
        if not cfg.overwrite:
            changes = config_changes(found, config)
            listed = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ValueError(f"{run_dir} holds a different training job ({listed}): pass another --run-dir, or "
                             "--overwrite.")
        import shutil

        for child in run_dir.iterdir():  # everything but the lock this process holds
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if saved.is_file() and all((f / "summary.json").is_file() for f in sae_folders(cfg).values()):
        return "done"
    return "resume" if saved.is_file() and latest_checkpoint(run_dir) else "fresh"


def config_changes(saved: dict, asked: dict, prefix: str = "") -> list[str]:
    """The fields in which two job configs differ, as flags: '--cache.tokens 20480 there, 40960 asked'."""
    missing = object()
    changes = []
    for key in sorted(set(saved) | set(asked)):
        old, new = saved.get(key, missing), asked.get(key, missing)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            def show(value) -> str:
                return "unset" if value is missing else json.dumps(value)
            changes.append(f"--{prefix}{key.replace('_', '-')} {show(old)} there, {show(new)} asked")
    return changes


def read_run_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON (truncated or edited by hand): delete it, or pass another "
                         "--run-dir.") from None


def run_lock(cfg: TrainConfig):
    """The run folder's lock (main rank only): a second `saewb train` into a folder in use is refused; the kernel
    releases it when the holder exits or is killed."""
    if not dist.is_main():
        from contextlib import nullcontext

        return nullcontext()
    return folder_lock(Path(cfg.run_dir), busy_message=(
        f"{cfg.run_dir} is in use by another `saewb train` ({{holder}}): wait for it to finish, or pass another "
        "--run-dir."))


def check_space(cfg: TrainConfig, trainer: Trainer) -> None:
    """Pre-flight: room for --keep-checkpoints checkpoints plus the one being written, and the final SAE folders."""
    final = sum(sum(p.numel() * p.element_size() for p in s.sae.parameters()) for s in trainer.states.values())
    new_checkpoints = max(1, cfg.keep_checkpoints + 1 - len(list_checkpoints(cfg.run_dir)))  # resumed: some exist
    needed = new_checkpoints * estimate_bytes(trainer) + int(1.1 * final)
    require_free(cfg.run_dir, needed, f"Training into {cfg.run_dir} ({cfg.keep_checkpoints} checkpoint(s) kept)",
                 "free space, lower --keep-checkpoints, or pass a --run-dir on a larger disk")


def save_final(sae: SAE, folder: Path) -> None:
    """The SAE folder (weights before cfg.json, each renamed into place); a failed write names the folder."""
    from safetensors import SafetensorError

    try:
        save_sae(sae, folder)
    except (OSError, SafetensorError) as error:
        raise write_error(error, Path(folder) / "sae_weights.safetensors",
                          "the final checkpoint is kept; free space there and run the same command again to write "
                          "the SAE from it") from None


def train(cfg: TrainConfig, model=None, progress: bool = True) -> dict[str, dict]:
    """Run the job; returns {sae name: summary}. Skips work a previous run of the same job already did.
    The run folder is locked for the whole job: a second `saewb train` into it is refused."""
    dist.init_from_env(cfg.cache.device)
    cfg.validate()
    with run_lock(cfg):
        return train_locked(cfg, model, progress)


def train_locked(cfg: TrainConfig, model=None, progress: bool = True) -> dict[str, dict]:
    config = config_json(cfg)
    status = prepare_run_dir(cfg, config)
    folders = sae_folders(cfg)
    if dist.is_main():
        remove_partial(cfg.run_dir, [cfg.run_dir, *folders.values()])  # what a killed job left half-written
    if status == "done":
        return {name: json.loads((f / "summary.json").read_text()) | {"skipped": True} for name, f in folders.items()}
    hooks = cfg.train_hooks
    if cfg.source == "cache":
        if not dist.is_main():
            dist.barrier()  # rank 0 writes the cache; the others then find it finished
        cache_dir = cache_activations(cfg.cache, model=model, progress=progress and dist.is_main())
        if dist.is_main():
            dist.barrier()
        cache = ActivationCache(cache_dir)
        train_ids, eval_ids, held_out = split_shards(cache, cfg.holdout_shards)
        if len(train_ids) < dist.world_size():
            raise ValueError(f"The cache has {len(train_ids)} training shard(s) for {dist.world_size()} ranks; every "
                             "rank needs its own: lower --cache.shard-tokens or cache more --cache.tokens.")
        scales = {h: cache.stats(h)["dataset_scalar"] for h in hooks}
        d_ins = {h: cache.d_in(h) for h in hooks}
        sample = {h: cache.shard_tokens(train_ids[0], h)[:4096] for h in hooks}
        metadata = {"cache_key": cache.manifest["key"], "context_length": cache.context_length}
    else:
        from training.model import load_model

        model = model or load_model(cfg.cache.model, device=cfg.cache.device, dtype=cfg.cache.dtype)
        first = next(model_batches(model, cfg.cache, hooks, cfg.batch_size, seed=cfg.seed, grads=False), None)
        if first is None:
            raise ValueError(f"--cache.tokens {cfg.cache.tokens} gives no full batch of {cfg.batch_size}: raise it.")
        sample = {h: first[h] for h in hooks}
        d_ins = {h: sample[h].shape[1] for h in hooks}
        scales = {h: d_ins[h] ** 0.5 / sample[h].norm(dim=-1).mean().item() for h in hooks}
        metadata = {"source": "model", "context_length": cfg.cache.context_length}
    saes = {}
    for spec in cfg.specs():
        sae = build_job_sae(cfg, spec, d_ins[spec["hook"]], scales[spec["hook"]], metadata).to(cfg.cache.device)
        sae.init_b_dec(sample[spec["hook"]].to(cfg.cache.device))
        saes[spec["name"]] = (sae, spec["hook"])
    needs_grads = any(sae.uses_grad for sae, _ in saes.values())
    per_rank = cfg.batch_size // dist.world_size()
    if cfg.source == "cache":
        my_shards = dist.shards_for_rank(train_ids)
        steps = cfg.epochs * dist.min_over_ranks(cache.n_batches(hooks, per_rank, my_shards))
        make_batches = lambda: cache_batches(cache, hooks, per_rank, seed=cfg.seed + dist.rank(), shards=my_shards,  # noqa: E731
                                             epochs=cfg.epochs, grads=needs_grads)
    else:
        # an estimate (BOS excluded; EOS and outliers are not known ahead): the loop also stops when data runs out
        steps = cfg.cache.n_contexts * (cfg.cache.context_length - 1) // cfg.batch_size
        make_batches = lambda: model_batches(model, cfg.cache, hooks, per_rank, seed=cfg.seed, grads=needs_grads)  # noqa: E731
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    if steps <= 0:
        raise ValueError(f"Not enough tokens for one batch of {cfg.batch_size}: cache more --cache.tokens or lower "
                         "--batch-size.")
    trainer = Trainer(saes, cfg.loop, steps, sync_every=cfg.log_every)  # device flags read at log steps only
    resumed_from = None
    if status == "resume":  # the newest checkpoint that reads back intact; damaged ones are reported and skipped
        resumed_from, state = resume_checkpoint(cfg.run_dir)
        if state is not None:
            trainer.load_state_dict(state)
            if dist.is_main():
                print(f"saewb: resuming {cfg.run_dir} from step {trainer.step} of {steps} ({trainer.tokens:,} tokens "
                      f"trained, checkpoint {resumed_from.name})", file=sys.stderr, flush=True)
    if dist.is_main():
        check_space(cfg, trainer)
    logger = run_loop(cfg, trainer, make_batches(), steps, config, folders, progress, resumed_from, make_batches)
    try:
        return write_summaries(cfg, trainer, saes, folders, logger,
                               (cache, cache_dir, eval_ids, held_out) if cfg.source == "cache" else None)
    finally:
        logger.close()


def write_summaries(cfg: TrainConfig, trainer: Trainer, saes: dict, folders: dict[str, Path], logger: RunLogger,
                    evaluation: tuple | None) -> dict[str, dict]:
    """Each SAE's summary.json (with FVU, L0 and never-fired latents on the evaluation shards when trained from a
    cache); those numbers also go to the job's W&B run, as eval/* (its report card so far)."""
    summaries = {}
    if dist.is_main():
        for name, (sae, hook) in saes.items():
            folder = folders[name]
            save_final(sae, folder)
            summary = {"architecture": sae.architecture, "hook": hook, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                       "steps": trainer.step, "train_tokens": trainer.tokens, **trainer.timings,
                       "this_sae_seconds": trainer.states[name].seconds}
            if evaluation is not None:
                cache, cache_dir, eval_ids, held_out = evaluation
                summary |= evaluate(load_sae(folder), cache, hook, eval_ids)
                summary["eval_split"] = "held-out shards" if held_out else "training data (single-shard cache)"
                summary["cache"] = str(cache_dir)
                if logger.run is not None:
                    logger.run.summary.update({logger.key(name, f"eval/{k}"): summary[k]
                                               for k in ("fvu", "l0", "never_fired_frac", "eval_tokens")})
            failpoint("train.before_summary")  # tests: final weights written, the "done" mark not yet
            write_json_atomic(folder / "summary.json", summary)  # the run's "done" mark: whole or absent
            summaries[name] = summary
    return summaries


def calibrate(trainer: Trainer, batches, n_batches: int, progress: bool) -> None:
    """Inference thresholds of the batch-dependent SAEs from `n_batches` training batches, weights frozen (§3.1).

    Every rank observes its own batches; the sums are combined so all ranks end with the same θ."""
    calibrators = {name: ThresholdCalibrator(s.sae) for name, s in trainer.states.items() if s.sae.batch_dependent}
    if not calibrators:
        return
    for batch in tqdm(islice(batches, n_batches), total=n_batches, desc="calibrate thresholds", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        for name, calibrator in calibrators.items():
            calibrator.observe(batch[trainer.states[name].hook])
    for calibrator in calibrators.values():
        dist.sum_over_ranks(calibrator.total)
        dist.sum_over_ranks(calibrator.count)
        calibrator.finish()


def run_loop(cfg: TrainConfig, trainer: Trainer, batches, steps: int, config: dict, folders: dict[str, Path],
             progress: bool, resumed_from: Path | None, make_batches) -> RunLogger:
    """Step through the batches with progress, metrics, histograms and checkpoints; calibrate thresholds at the
    end (on a fresh pass over the training batches, `make_batches()`), then write the final checkpoint and SAEs.
    Returns the logger, still open (the caller adds the evaluation and closes it); closed here on an error.

    W&B: one run per job. Its id is kept in run_dir/wandb_id.txt and reused by any later run of the same job
    (resume='allow'), so a resumed job continues the same run (offline, in the same single folder:
    training.logger.wandb_init)."""
    main = dist.is_main()
    for _ in range(trainer.step):  # exact resume: skip the batches already trained on
        next(batches)
    run_dir = Path(cfg.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / "config.json", config)
    wandb_id_file = run_dir / "wandb_id.txt"
    logger = RunLogger(folders if main else {}, config, wandb_mode=cfg.wandb if main else "off",
                       project=cfg.wandb_project, run_name=run_dir.name, wandb_dir=run_dir,
                       resume_id=read_wandb_id(run_dir), resume_step=trainer.step if resumed_from else None,
                       wandb_resume_step=trainer.step)
    if main and logger.wandb_id:
        wandb_id_file.write_text(logger.wandb_id)
    bar = tqdm(total=steps * cfg.batch_size, initial=trainer.tokens, unit="tok", unit_scale=True, desc="train",
               mininterval=0.5, disable=not (progress and main), dynamic_ncols=True)
    next_checkpoint = trainer.tokens + cfg.checkpoint_every if cfg.checkpoint_every else None
    fired = {name: torch.zeros(s.sae.cfg.d_sae, device=s.sae.W_dec.device)  # [d_sae] firings, on the device
             for name, s in trainer.states.items()}
    window = 0
    data_seconds, started, start_tokens = 0.0, time.perf_counter(), trainer.tokens
    finished = False
    try:
        while trainer.step < steps:
            tick = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            data_seconds += time.perf_counter() - tick
            records = trainer.train_step(batch)
            window += cfg.batch_size // dist.world_size()
            elapsed = time.perf_counter() - started
            extra = {"tokens_per_s": (trainer.tokens - start_tokens) / max(elapsed, 1e-9), "data_s": data_seconds,
                     "sae_s": trainer.timings["sae_seconds"]}
            for name, record in records.items():
                fired[name] += record["_fired"]  # firings per latent, from the sparse selection
            log_now = trainer.step % cfg.log_every == 0 or trainer.step == steps  # the only steps that read the device
            if main:
                logger.log(records, trainer.step, extra, to_wandb=log_now)
                if log_now:
                    for name, record in records.items():
                        counts = fired[name].cpu()
                        alive = counts[counts > 0]  # latents silent over the window have no log10
                        logger.log_histograms(name, record["_l0"].cpu(), (alive / window).log10(),
                                              trainer.step, silent=len(counts) - len(alive))
                        fired[name].zero_()
                    window = 0
            bar.update(cfg.batch_size)
            if log_now and not bar.disable:
                (first,) = to_host([next(iter(records.values()))])  # one read of the first SAE's record
                bar.set_postfix({k: f"{first[k]:.4g}" for k in ("loss", "fvu", "l0") if k in first})
            if main and next_checkpoint is not None and trainer.tokens >= next_checkpoint:
                logger.flush()  # rows up to the checkpoint are on disk before it is (a resume drops any later ones)
                save_checkpoint(run_dir, trainer, cfg.keep_checkpoints)
                next_checkpoint += cfg.checkpoint_every
        calibrate(trainer, make_batches(), cfg.loop.calibration_batches, progress and main)
        if main:
            logger.flush()  # every row is on disk before the final checkpoint: a resume from it re-logs none
            save_checkpoint(run_dir, trainer, cfg.keep_checkpoints)
            for name, state in trainer.states.items():
                save_final(state.sae, folders[name])
                logger.log_artifact(name, folders[name])
        finished = True
    except NonFiniteLossError as error:
        last = latest_checkpoint(run_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise FloatingPointError(f"{error} Training stopped; {where}.") from None
    finally:
        bar.close()
        if not finished:
            logger.close()
        trainer.timings["data_seconds"] = data_seconds
    return logger
