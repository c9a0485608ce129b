"""Every registered SAE variant on the same data, for the same number of tokens, in one table (issue #4).

Two data sets, each shared by all variants (same batches in the same order, same init seed):
- `synthetic`: a planted dictionary (training/synthetic.py) with the settings of the variants' planted-recovery
  tests (d=32, 96 directions, ~4 active, d_sae=192, k=6, batch 512, 600 steps, lr 4e-3). g-SAE gets per-token
  gradients of a cross-entropy through a fixed readout along 8 planted directions (as in tests/saes/test_gradient.py).
- `model`: cached residual-stream activations of `--model` (tiny: random 2-layer Llama, d=64; smollm2: the embedded
  SmolLM2-135M, d=576) at the middle block, cached with per-token gradients so g-SAE trains on the same tokens.
  Inputs are scaled by the dataset scalar sqrt(d)/E||x|| (as `saewb train` does); the last shard is held out.

Per variant: held-out FVU (pooled), measured L0 of inference-mode codes (`encode`: thresholds for batch-dependent
variants), dead % (latents that never fire on the held-out tokens), planted recovery (mean best |cos| of the
planted directions with decoder rows, and the fraction above 0.9; synthetic only) and training tokens/s (SAE steps
only: forward, backward, optimiser, step hooks; data loading excluded). Compare variants at their measured L0, not
their nominal k (docs/methods.md Appendix D, item 14).

    python -m bench.variants                       # tiny model + synthetic, about 1-2 minutes on 2 cores
    python -m bench.variants --model smollm2 --model-steps 300
    python -m bench.variants --set abstopk.selection=per_token --set jumprelu.sparsity_coef=0.5
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from bench.machine import describe_machine
from saes import ARCHITECTURES, build_sae, calibrate_thresholds, sae_class
from saes.base import SAE
from training.synthetic import fraction_recovered, make_planted, mean_best_cosine, with_gradients
from training.trainer import LoopConfig, Trainer, as_pair

# Per-variant settings beyond d_in, d_sae, k (tuned in each variant's planted-recovery test). "k" means the run's k. `scaled`: on synthetic data the inputs are scaled to E||x|| = sqrt(d) (their tests do
# this; their sparsity coefficient and threshold bandwidth are in those units). On model data every variant is scaled.
VARIANT_SETTINGS: dict[str, dict] = {
    "topk": {},
    "batchtopk": {},
    "jumprelu": {"threshold_init": 0.2, "bandwidth": 0.1, "sparsity_coef": 1.0, "scaled": True},
    "relu_l1": {"l1_coef": 1.0, "scaled": True},
    "abstopk": {},
    "matching_pursuit": {},
    "matching_pursuit_signed": {},
    "gradient_topk": {"beta": 1.0},
    "hierarchical_topk": {"k_max": "k"},
    "mutual_choice": {},
    "feature_choice": {},
}
"""Registered names missing here train with their config defaults (plus k where they have one)."""
SYMBOLIC = {"k": "k"}


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """--set ARCH.FIELD=VALUE ... -> {arch: {field: value}}."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        arch, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ValueError(f"--set takes ARCH.FIELD=VALUE (e.g. abstopk.selection=per_token), got {item!r}.")
        sae_class(arch)  # unknown architectures list the registered ones
        overrides.setdefault(arch, {})[name] = parse_value(value)
    return overrides


def variant_fields(arch: str, d_in: int, d_sae: int, k: int, steps: int, overrides: dict) -> tuple[dict, bool]:
    """Config fields for one variant, and whether it wants scaled inputs on synthetic data."""
    settings = {**VARIANT_SETTINGS.get(arch, {}), **overrides.get(arch, {})}
    scaled = bool(settings.pop("scaled", False))
    names = {f.name for f in dataclasses.fields(sae_class(arch).config_cls)}
    fields = {"d_in": d_in, "d_sae": d_sae}
    if "k" in names and arch != "hierarchical_topk":  # hierarchical's k is the inference budget; k_max trains
        fields["k"] = k
    special = {"k": k}
    for name, value in settings.items():
        if name not in names:
            raise ValueError(f"{arch} has no config field {name!r}; its fields: {', '.join(sorted(names))}.")
        fields[name] = special.get(value, value) if isinstance(value, str) else value
    return fields, scaled


def describe_settings(arch: str, overrides: dict) -> str:
    """The variant's settings as written in VARIANT_SETTINGS (+ overrides), e.g. `k_max=k`."""
    settings = {**VARIANT_SETTINGS.get(arch, {}), **overrides.get(arch, {})}
    scaled = settings.pop("scaled", False)
    names = {f.name for f in dataclasses.fields(sae_class(arch).config_cls)}
    parts = ["k=k"] if "k" in names and arch != "hierarchical_topk" else []
    parts += [f"{name}={SYMBOLIC.get(v, v) if isinstance(v, str) else v}" for name, v in settings.items()]
    if scaled:
        parts.append("synthetic inputs scaled to E||x||=sqrt(d)")
    return ", ".join(parts) or "config defaults"


# ---- evaluation ---------------------------------------------------------------------------------------------
class HeldOut:
    """Pooled FVU, mean L0 and never-fired latents over held-out chunks (training.run.evaluate, for any source)."""

    def __init__(self, d_in: int, d_sae: int):
        self.sq_err, self.n, self.sq_sum, self.l0 = 0.0, 0, 0.0, 0.0
        self.total = torch.zeros(d_in, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.no_grad()
    def add(self, sae: SAE, x: Tensor) -> None:
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        self.sq_err += (x - x_hat).double().pow(2).sum().item()
        self.total += x.double().sum(0)
        self.sq_sum += x.double().pow(2).sum().item()
        self.l0 += (codes != 0).sum().item()
        self.fired |= (codes != 0).any(0)
        self.n += len(x)

    def result(self) -> dict:
        variance = self.sq_sum - self.total.pow(2).sum().item() / self.n
        return {"fvu": self.sq_err / variance, "l0": self.l0 / self.n,
                "dead_pct": 100 * (1 - self.fired.float().mean().item()), "eval_tokens": self.n}


# ---- training -----------------------------------------------------------------------------------------------
def train_timed(sae: SAE, batches: Iterator, steps: int, loop: LoopConfig, calibration: Callable[[], Iterator]) -> dict:
    """Train in place; time only the SAE steps. Batches are x or (x, grad); grad goes only to variants using it.
    Batch-dependent variants then calibrate their inference threshold on `calibration()`'s batches (§3.1)."""
    trainer = Trainer({"sae": (sae, "x")}, loop, steps)
    seconds, record = 0.0, {}
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            break
        x, grad = as_pair(batch)
        item = (x, grad) if sae.uses_grad else x
        started = time.perf_counter()
        record = trainer.train_step({"x": item})["sae"]
        seconds += time.perf_counter() - started
    result = {"steps": trainer.step, "train_tokens": trainer.tokens, "train_s": seconds,
            "tokens_per_s": trainer.tokens / max(seconds, 1e-9),
            "train_fvu": record.get("fvu", math.nan), "train_l0": record.get("l0", math.nan)}
    calibrate_thresholds(sae, (as_pair(batch)[0] for batch in calibration()), loop.calibration_batches)
    return result


def run_synthetic(args, overrides: dict, log) -> tuple[dict, dict]:
    planted = make_planted(d=args.syn_d, n_true=args.syn_n_true, mean_active=args.syn_mean_active, seed=args.seed + 3)
    sample = planted.sample(2048, torch.Generator().manual_seed(args.seed + 9))
    held_out = planted.sample(args.syn_eval_tokens, torch.Generator().manual_seed(args.seed + 11))
    scale = (args.syn_d ** 0.5 / sample.norm(dim=-1).mean()).item()
    loop = LoopConfig(lr=args.lr, warmup_steps=args.warmup_steps, dead_tokens=args.dead_tokens)
    rows, fields_used = {}, {}
    for arch in args.architectures:
        fields, scaled = variant_fields(arch, args.syn_d, args.syn_d_sae, args.syn_k, args.syn_steps, overrides)
        if scaled:
            fields["input_scale"] = scale
        sae = build_sae(arch, seed=args.seed, **fields)
        sae.init_b_dec(sample)
        batches = with_gradients(planted, args.batch_size, args.seed)  # same x for every variant
        row = train_timed(sae, batches, args.syn_steps, loop,
                          lambda: with_gradients(planted, args.batch_size, args.seed))
        evaluation = HeldOut(args.syn_d, args.syn_d_sae)
        for chunk in held_out.split(4096):
            evaluation.add(sae, chunk)
        row |= evaluation.result()
        row["mean_best_cosine"] = mean_best_cosine(sae.W_dec, planted.directions)
        row["frac_recovered"] = fraction_recovered(sae.W_dec, planted.directions, 0.9)
        rows[arch] = row
        fields_used[arch] = {k: v for k, v in fields.items() if k not in ("d_in", "d_sae")}
        log(f"synthetic {arch:24s} FVU {row['fvu']:.3f}  L0 {row['l0']:5.2f}  dead {row['dead_pct']:5.1f}%  "
            f"cos {row['mean_best_cosine']:.3f}  {row['tokens_per_s']:,.0f} tok/s")
    settings = {"d_in": args.syn_d, "n_true": args.syn_n_true, "mean_active": args.syn_mean_active,
                "d_sae": args.syn_d_sae, "k": args.syn_k, "steps": args.syn_steps, "batch_size": args.batch_size,
                "train_tokens": args.syn_steps * args.batch_size, "eval_tokens": args.syn_eval_tokens,
                "dataset_scalar_for_scaled_variants": scale, "planted_seed": args.seed + 3}
    return {"settings": settings, "rows": rows}, fields_used


def build_cache(args, log):
    from training.activation_store import ActivationCache
    from training.caching import CacheConfig, cache_activations
    from training.model import load_model

    started = time.perf_counter()
    model = load_model(args.model, dtype=args.cache_dtype)
    hook = args.hook or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    cfg = CacheConfig(model=args.model, hooks=[hook], tokens=args.cache_tokens, context_length=args.context_length,
                      dtype=args.cache_dtype, gradients=True, shard_tokens=args.shard_tokens, out=args.cache_dir)
    folder = cache_activations(cfg, model=model, progress=False)
    del model
    log(f"cache {folder} ready in {time.perf_counter() - started:.1f} s")
    return ActivationCache(folder), hook, cfg


def run_model(args, overrides: dict, log) -> tuple[dict, dict]:
    from training.run import split_shards

    cache, hook, cache_cfg = build_cache(args, log)
    train_ids, eval_ids, held = split_shards(cache, 1)
    d = cache.d_in(hook)
    d_sae = args.model_expansion * d
    scale = cache.stats(hook)["dataset_scalar"]
    sample = cache.shard_tokens(train_ids[0], hook)[:4096]
    per_epoch = cache.n_batches([hook], args.batch_size, train_ids)
    if per_epoch == 0:
        raise ValueError(f"The cache's training shards hold no full batch of {args.batch_size}: raise --cache-tokens.")
    epochs = math.ceil(args.model_steps / per_epoch)
    loop = LoopConfig(lr=args.lr, warmup_steps=args.warmup_steps, dead_tokens=args.dead_tokens)
    rows, fields_used = {}, {}
    for arch in args.architectures:
        fields, _ = variant_fields(arch, d, d_sae, args.model_k, args.model_steps, overrides)
        sae = build_sae(arch, seed=args.seed, input_scale=scale, **fields)
        sae.init_b_dec(sample)
        # (x, grad) for everyone: the same seed gives the same x in the same order; only g-SAE is given grad
        batches = cache.batches(hook, args.batch_size, seed=args.seed, shards=train_ids, grads=True, epochs=epochs)
        row = train_timed(sae, iter(batches), args.model_steps, loop,
                          lambda: iter(cache.batches(hook, args.batch_size, seed=args.seed, shards=train_ids)))
        evaluation = HeldOut(d, d_sae)
        for index in eval_ids:
            for chunk in cache.shard_tokens(index, hook).split(4096):
                evaluation.add(sae, chunk)
        row |= evaluation.result()
        rows[arch] = row
        fields_used[arch] = {k: v for k, v in fields.items() if k not in ("d_in", "d_sae")} | {"input_scale": scale}
        log(f"{args.model} {arch:24s} FVU {row['fvu']:.3f}  L0 {row['l0']:5.2f}  dead {row['dead_pct']:5.1f}%  "
            f"{row['tokens_per_s']:,.0f} tok/s")
    settings = {"model": args.model, "hook": hook, "d_in": d, "d_sae": d_sae, "k": args.model_k,
                "steps": args.model_steps, "batch_size": args.batch_size,
                "train_tokens": args.model_steps * args.batch_size, "epochs_over_training_shards": epochs,
                "cache": str(cache.path), "cache_key": cache.manifest["key"], "cache_tokens": cache_cfg.tokens,
                "context_length": cache.context_length, "cache_dtype": args.cache_dtype,
                "eval_split": "held-out last shard" if held else "training data (single-shard cache)",
                "dataset_scalar": scale, "corpus": cache_cfg.corpus}
    return {"settings": settings, "rows": rows}, fields_used


# ---- report -------------------------------------------------------------------------------------------------
def fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    syn, real = report["synthetic"], report["model"]
    s, m = syn["settings"], real["settings"]
    name = m["model"]
    lines = [
        "# SAE variants: same data, same tokens",
        "",
        f"Synthetic: planted dictionary d={s['d_in']}, {s['n_true']} directions, ~{s['mean_active']} active, "
        f"d_sae={s['d_sae']}, k={s['k']}, {s['steps']} steps x {s['batch_size']} = {s['train_tokens']:,} tokens, "
        f"evaluated on {s['eval_tokens']:,} fresh samples. "
        f"Model: `{name}` `{m['hook']}` d={m['d_in']}, d_sae={m['d_sae']}, k={m['k']}, {m['steps']} steps x "
        f"{m['batch_size']} = {m['train_tokens']:,} tokens, evaluated on the {m['eval_split']}.",
        "",
        "| variant | syn FVU | syn L0 | syn dead % | syn mean cos | syn frac>0.9 | syn tok/s | "
        f"{name} FVU | {name} L0 | {name} dead % | {name} tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in report["architectures"]:
        a, b = syn["rows"][arch], real["rows"][arch]
        lines.append(
            f"| {arch} | {fmt(a['fvu'], 3)} | {fmt(a['l0'], 2)} | {fmt(a['dead_pct'], 1)} | "
            f"{fmt(a['mean_best_cosine'], 3)} | {fmt(a['frac_recovered'], 2)} | {a['tokens_per_s']:,.0f} | "
            f"{fmt(b['fvu'], 3)} | {fmt(b['l0'], 2)} | {fmt(b['dead_pct'], 1)} | {b['tokens_per_s']:,.0f} |")
    machine, shared = report["machine"], report["settings"]
    lines += [
        "",
        "Notes:",
        "- FVU: pooled over held-out tokens, sum ||x - x_hat||^2 / sum ||x - mean||^2, raw activation space. "
        "L0: mean non-zero codes per token in inference mode (`encode`; thresholds for batch-dependent variants). "
        "Dead %: latents that never fired on the held-out tokens. tok/s: SAE training steps only (data loading "
        "excluded), batches in the same order for every variant.",
        "- Compare variants at their **measured L0**, not the nominal k (docs/methods.md Appendix D, item 14): "
        "JumpReLU and ReLU+L1 have no k (their L0 follows the sparsity coefficient); BatchTopK, Mutual/Feature "
        "Choice and batch-mode AbsTopK infer with thresholds, so their L0 only approximates k; MP may stop early. "
        "Mutual Choice is BatchTopK under another name (identical rows expected).",
        f"- Shared: Adam lr {shared['lr']}, warm-up {shared['warmup_steps']} steps (capped at 10% of the run), "
        f"linear decay over the last 20%, grad clip 1, AuxK on latents silent for {shared['dead_tokens']:,} tokens; "
        f"init seed {shared['seed']}; b_dec initialised at the geometric median. Model data is scaled by the "
        f"dataset scalar sqrt(d)/E||x|| = {m['dataset_scalar']:.4g} for every variant; synthetic data only where "
        "noted.",
        f"- Per-variant settings (k = {s['k']} synthetic, {m['k']} model; steps = that run's steps; from each "
        "variant's planted-recovery test in tests/saes/; exact fields in the JSON under `sae_fields`):",
    ]
    lines += [f"  - `{arch}`: {describe_settings(arch, shared['overrides'])}" for arch in report["architectures"]]
    lines += [
        "- g-SAE (gradient_topk) trains on (x, grad) pairs: on the model, the gradient of the summed next-token loss "
        "stored in the cache; on synthetic data, the gradient of a cross-entropy through a fixed readout along 8 "
        "planted directions. Its inference is plain TopK.",
        f"- Machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')} with "
        f"{machine.get('torch_threads')} thread(s); {machine.get('gpu', 'no GPU')}. "
        f"Wall time {report['wall_s']:.0f} s. Command: `{report['command']}`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES),
                        help="variants to run (default: every registered one)")
    parser.add_argument("--model", default="tiny", help="'tiny' (default) or 'smollm2' (the embedded model)")
    parser.add_argument("--hook", help="hook to cache and train on (default: blocks.<n_layers//2>.hook_resid_post)")
    parser.add_argument("--cache-tokens", type=int, default=139_264,
                        help="tokens to cache (default 17 shards of 8,192; the last one is held out)")
    parser.add_argument("--shard-tokens", type=int, default=8192)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache-dir", type=Path, help="cache folder (default: content-addressed under ~/.cache/saewb)")
    parser.add_argument("--model-expansion", type=int, default=4, help="d_sae = expansion x d_model")
    parser.add_argument("--model-k", type=int, default=16)
    parser.add_argument("--model-steps", type=int, default=600)
    parser.add_argument("--syn-d", type=int, default=32)
    parser.add_argument("--syn-n-true", type=int, default=96)
    parser.add_argument("--syn-mean-active", type=float, default=4.0)
    parser.add_argument("--syn-d-sae", type=int, default=192)
    parser.add_argument("--syn-k", type=int, default=6)
    parser.add_argument("--syn-steps", type=int, default=600)
    parser.add_argument("--syn-eval-tokens", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per step, both data sets")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--dead-tokens", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="ARCH.FIELD=VALUE",
                        help="override a variant's config field, e.g. --set abstopk.selection=per_token (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for the small default sizes; 0 keeps torch's default)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for variants.{md,json}")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for arch in args.architectures:
        sae_class(arch)
    overrides = parse_overrides(args.overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log = (lambda _: None) if args.quiet else (lambda text: print(text, flush=True))
    started = time.perf_counter()
    synthetic, syn_fields = run_synthetic(args, overrides, log)
    model, model_fields = run_model(args, overrides, log)
    report = {
        "benchmark": "variants", "architectures": list(args.architectures),
        "settings": {"lr": args.lr, "warmup_steps": args.warmup_steps, "dead_tokens": args.dead_tokens,
                     "seed": args.seed, "batch_size": args.batch_size, "overrides": overrides,
                     "variant_settings": {a: VARIANT_SETTINGS.get(a, {}) for a in args.architectures},
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
        "synthetic": synthetic, "model": model,
        "sae_fields": {"synthetic": syn_fields, "model": model_fields},
        "machine": describe_machine("cpu"),
        "command": " ".join(["python -m bench.variants", *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "variants.md").write_text(markdown(report))
    log(markdown(report))
    return report


if __name__ == "__main__":
    main()
