"""SAE training throughput (tokens/s) of the default `saewb train` step, per TopK-family variant, against its dense
path, a plain PyTorch loop, sparsify's own training step and the floor, all in one run.

Every trainer takes the same in-memory batches (cached activations with --cache, else Gaussian data of the same
shape; the reader is not what is measured):
- `<variant>`: `training.trainer.Trainer.train_step`, the step the CLI runs, with the variant's defaults (the fast
  path of saes/sparse_topk.py); `<variant>-dense`: the same with `kernel="dense"` (the reference path);
- `plain`: the textbook loop (encoder matmul, topk, scatter to dense codes, dense decode, MSE, Adam);
- `sparsify`: EleutherAI sparsify's own step (its SparseCoder, its trainer's default signum optimiser, decoder
  renormalisation and gradient projection, dead-latent bookkeeping), run in its own venv (--sparsify-python);
- the floor: the dense encoder forward alone, 2·d·n FLOP per token at the matmul rate measured in the same run.
On a shared machine the load comes and goes within seconds, so the runs are interleaved step by step over --rounds
rounds, each step timed right after a floor matmul: a run reports its best step (least disturbed), its median step,
and the median over rounds of floor/step from those adjacent pairs (its fraction of the floor, which load changes
much less than either time); speedups are medians of the ratios of adjacent steps (the dense path runs right after
the fast one). Then a profile of the default TopK step by phase, and the peak memory
of one default TopK step at d_sae = 65,536 and 131,072 (fresh process each, VmHWM reset before the step).

    python -m bench.train_throughput --preset cpu
    python -m bench.train_throughput --preset gpu    # on a CUDA machine
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.machine import describe_machine
from saes import build_sae, kernels
from training.trainer import LoopConfig, Trainer

PRESETS = {"cpu": dict(d=576, n=2304, k=32, batch=4096, dtype="float32", device="cpu", threads=2),
           "gpu": dict(d=768, n=24576, k=32, batch=4096, dtype="bfloat16", device="cuda", threads=None)}
VARIANTS = {
    "topk": ("topk", {}),
    "topk-multi_topk": ("topk", {"multi_topk": True}),
    "batchtopk": ("batchtopk", {}),
    "mutual_choice": ("mutual_choice", {}),
    "abstopk-per_token": ("abstopk", {"selection": "per_token"}),
    "abstopk-batch": ("abstopk", {"selection": "batch"}),
    "hierarchical_topk": ("hierarchical_topk", {}),
    "gradient_topk": ("gradient_topk", {}),
}
"""The TopK family: architecture and config fields (k, or k_max for HierarchicalTopK, comes from the preset)."""
MEMORY_SIZES = (65_536, 131_072)
DEFAULT_SPARSIFY_PYTHON = Path.home() / ".cache/saewb/sparsify-venv/bin/python"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_data(args, d: int, batch: int, device: str, grads: bool) -> tuple[list, str]:
    if args.cache:
        from training.activation_store import ActivationCache

        cache = ActivationCache(args.cache)
        hook = args.hook or cache.hooks[0]
        batches = [b.to(device) for _, b in zip(range(args.batches), cache.batches(hook, batch, seed=0))]
        source = f"cache {args.cache} ({hook})"
    else:
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(batch, d, generator=generator).to(device) for _ in range(args.batches)]
        source = "gaussian"
    if grads:
        generator = torch.Generator().manual_seed(1)
        return [(x, torch.randn(x.shape, generator=generator).to(device)) for x in batches], source
    return batches, source


def plain_loop(d: int, n: int, k: int, data: list, device: str, autocast: bool):
    W_enc = torch.nn.Parameter(torch.randn(n, d, device=device) / d**0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(n, device=device))
    b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    state = {"i": 0}

    def step():
        x = data[state["i"] % len(data)]
        state["i"] += 1
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            pre = (x - b_dec) @ W_enc.T + b_enc
            values, indices = pre.topk(k, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
            loss = ((codes @ W_dec + b_dec - x) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build_trainer(architecture: str, fields: dict, d: int, n: int, k: int, data: list, device: str, autocast: bool,
                  compile_: bool = False) -> Trainer:
    budget = {"k_max": k} if architecture == "hierarchical_topk" else {"k": k}
    sae = build_sae(architecture, d_in=d, d_sae=n, **budget, **fields).to(device)
    tokens = data[0][0].shape[0] if isinstance(data[0], tuple) else data[0].shape[0]
    loop = LoopConfig(lr=1e-4, warmup_steps=1, dead_tokens=10 * len(data) * tokens,
                      autocast="bf16" if autocast else "off", compile=compile_)
    return Trainer({"sae": (sae, "x")}, loop, total_steps=10**9)


def trainer_step(trainer: Trainer, data: list):
    state = {"i": 0}

    def step():
        trainer.train_step({"x": data[state["i"] % len(data)]})
        state["i"] += 1

    return step


def floor_step(d: int, n: int, batch: int, dtype: torch.dtype, device: str):
    """The dense encoder forward: one [batch, d] x [d, n] matmul (2·d·n FLOP per token)."""
    a = torch.randn(batch, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    return lambda: a @ b


SPARSIFY_STEP = r'''
import json, sys, time, torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD
from schedulefree import ScheduleFreeWrapper
d, n, k, batch, n_batches, warmup, steps, threads = map(int, sys.argv[1:9])
torch.set_num_threads(threads)
generator = torch.Generator().manual_seed(0)
data = [torch.randn(batch, d, generator=generator) for _ in range(n_batches)]
sae = SparseCoder(d, SparseCoderConfig(k=k, num_latents=n), device="cpu", dtype=torch.float32)
# sparsify's trainer defaults: signum (schedule-free SignSGD), lr 5e-3 / sqrt(n / 2^14), auxk_alpha 0, fvu loss
opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (n / 2**14) ** 0.5)]), momentum=0.95)
opt.train()
tokens_since_fired = torch.zeros(n, dtype=torch.long)
did_fire = torch.zeros(n, dtype=torch.bool)
def step(i):
    x = data[i % n_batches]
    sae.set_decoder_norm_to_unit_norm()
    out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
    did_fire[out.latent_indices.flatten()] = True
    float(out.fvu.detach())  # the trainer's running average reads it every step
    (out.fvu + out.multi_topk_fvu / 8).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        tokens_since_fired.add_(batch)
        tokens_since_fired[did_fire] = 0
        did_fire.zero_()
for i in range(warmup):
    step(i)
a, b = torch.randn(batch, d), torch.randn(d, n)
times, floors = [], []
for i in range(steps):
    start = time.perf_counter()
    a @ b  # the floor, timed right before the step as in the main process
    floors.append(time.perf_counter() - start)
    start = time.perf_counter()
    step(warmup + i)
    times.append(time.perf_counter() - start)
import sparsify
print(json.dumps({"step_s": times, "floor_s": floors, "version": sparsify.__version__}))
'''


def sparsify_round(python: Path, p: dict, args) -> dict | None:
    """Mean step time of sparsify's own step over args.steps steps, in its venv (None when it is not there)."""
    if not python.is_file() or p["device"] != "cpu":
        return None
    cmd = [str(python), "-c", SPARSIFY_STEP, *map(str, (p["d"], p["n"], p["k"], p["batch"], args.batches,
                                                         args.warmup, args.steps, p["threads"]))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        print(f"sparsify step failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_steps(fn, steps: int, device: str) -> float:
    """Mean seconds per call over `steps` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


# ---- profile of the default TopK step ------------------------------------------------------------------------
PHASES = [
    ("encoder matmul", "saes.sparse_topk.encoder_pre_acts"),
    ("top-k selection", "select_sparse"),
    ("gather of the selected pre-activations", "saes.sparse_topk.gather_pre_acts"),
    ("decode + squared error + value dots (forward)", "saes.sparse_topk.decode_error"),
    ("backward: decode (W_dec rows, value gradients)", "autograd::engine::evaluate_function: _DecodeErrorBackward"),
    ("backward: encoder (W_enc rows, b_enc, b_dec)", "autograd::engine::evaluate_function: _GatherPreActsBackward"),
    ("projection (radial gradient out)", "after_backward"),
    ("clip + fused Adam", "optimizer_step"),
    ("decoder renormalisation", "after_step"),
    ("dead-latent counter", "update_sparse"),
]


@contextmanager
def labelled_phases(trainer: Trainer):
    """Wrap the functions of each phase in torch.profiler.record_function for the duration of the profile."""
    import saes.sparse_topk as fast
    from training import trainer as trainer_module

    sae = trainer.states["sae"].sae
    patches = []

    def label(owner, name, tag):
        original = getattr(owner, name)

        def wrapped(*a, **kw):
            with torch.profiler.record_function(tag):
                return original(*a, **kw)

        patches.append((owner, name, original))
        setattr(owner, name, wrapped)

    for fn in ("encoder_pre_acts", "gather_pre_acts", "decode_error"):
        label(fast, fn, f"saes.sparse_topk.{fn}")  # the SAEs call them as attributes of this module
    for name in ("select_sparse", "after_backward", "after_step"):
        label(sae, name, name)
    label(trainer_module.SAEState, "optimizer_step", "optimizer_step")
    label(trainer_module.DeadLatentCounter, "update_sparse", "update_sparse")
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            if owner is sae:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def profile_default_step(p: dict, data: list, steps: int) -> dict:
    """Time per phase of the default TopK step (torch.profiler, CPU time of labelled ranges), in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    trainer = build_trainer("topk", {}, p["d"], p["n"], p["k"], data, p["device"], p["dtype"] == "bfloat16")
    step = trainer_step(trainer, data)
    for _ in range(2):
        step()
    with labelled_phases(trainer):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("train_step"):
                    step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[event.key] = totals.get(event.key, 0.0) + event.cpu_time_total
    step_us = totals.get("train_step", 0.0) / steps
    phases = {}
    for phase, keys in PHASES:
        phases[phase] = sum(totals.get(key, 0.0) for key in keys.split("|")) / steps / 1e3
    phases["other (schedule, records, Python)"] = step_us / 1e3 - sum(phases.values())
    ops = sorted(((e.key, e.self_cpu_time_total / steps / 1e3) for e in prof.key_averages()
                  if e.key.startswith("aten::")), key=lambda kv: -kv[1])[:12]
    return {"step_ms_under_profiler": round(step_us / 1e3, 1),
            "phases_ms": {k: round(v, 1) for k, v in phases.items()},
            "phases_fraction": {k: round(v / (step_us / 1e3), 3) for k, v in phases.items()},
            "top_ops_self_ms": {k: round(v, 1) for k, v in ops}}


# ---- peak memory -----------------------------------------------------------------------------------------------
def memory_child(n: int, p: dict, kernel: str) -> dict:
    """In a fresh process: resident memory with the SAE, Adam state and one batch, then the peak during one step."""
    def status(key: str) -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

    if p["threads"]:
        torch.set_num_threads(p["threads"])
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(p["batch"], p["d"], generator=generator)]
    trainer = build_trainer("topk", {"kernel": kernel}, p["d"], n, p["k"], data, "cpu", False)
    trainer.train_step({"x": data[0]})  # Adam state and gradients exist from here on
    resident = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    trainer.train_step({"x": data[0]})
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    return {"d_sae": n, "kernel": kernel, "resident_gib": round(resident / 2**30, 3),
            "step_peak_gib": round(peak / 2**30, 3), "step_extra_gib": round((peak - resident) / 2**30, 3),
            "step_s": round(seconds, 2)}


def peak_memory(preset: str, sizes, kernel: str = "sparse") -> list[dict]:
    out = []
    for n in sizes:
        done = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--preset", preset,
                               "--memory-child", str(n), "--memory-kernel", kernel],
                              capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            out.append({"d_sae": n, "kernel": kernel, "error": done.stderr[-1500:]})
        else:
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


# ---- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per run and round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="distinct batches cycled through")
    parser.add_argument("--cache", type=Path, help="read batches from this activation cache")
    parser.add_argument("--hook")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also time the default TopK step under torch.compile")
    parser.add_argument("--sparsify-python", type=Path, default=DEFAULT_SPARSIFY_PYTHON,
                        help="python of a venv with eai-sparsify (skipped when missing)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-kernel", default="sparse", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, p, args.memory_kernel)))
        return
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    d, n, k, batch, device = p["d"], p["n"], p["k"], p["batch"], p["device"]
    autocast = p["dtype"] == "bfloat16"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    load_before = os.getloadavg()
    data, source = make_data(args, d, batch, device, grads=False)
    pairs, _ = make_data(args, d, batch, device, grads=True)

    runs = {"floor": floor_step(d, n, batch, getattr(torch, p["dtype"]), device),
            "plain": plain_loop(d, n, k, data, device, autocast)}
    trainers = {}
    for name in args.variants:
        architecture, fields = VARIANTS[name]
        batches = pairs if architecture == "gradient_topk" else data
        for suffix, extra in (("", {}), ("-dense", {"kernel": "dense"})):
            trainers[name + suffix] = build_trainer(architecture, fields | extra, d, n, k, batches, device, autocast)
            runs[name + suffix] = trainer_step(trainers[name + suffix], batches)
    if args.compile:
        runs["topk-compiled"] = trainer_step(build_trainer("topk", {}, d, n, k, data, device, autocast, True), data)
    for fn in runs.values():  # warm-up, outside the rounds
        for _ in range(args.warmup):
            fn()
    floor = runs.pop("floor")
    steps: dict[str, list[float]] = {name: [] for name in runs}
    floors: dict[str, list[float]] = {name: [] for name in runs}
    sparsify_version = None
    for _ in range(args.rounds):
        for name, fn in runs.items():
            floors[name].append(time_steps(floor, 1, device))
            steps[name].append(time_steps(fn, args.steps, device))
        if args.sparsify_python:
            result = sparsify_round(args.sparsify_python, p, args)
            if result:
                steps.setdefault("sparsify", []).extend(result["step_s"])
                floors.setdefault("sparsify", []).extend(result["floor_s"])
                sparsify_version = result["version"]
    all_floors = [t for times in floors.values() for t in times]
    floor_best = min(all_floors)
    matmul_rate = 2 * batch * d * n / floor_best
    results = {"floor": {"tokens_per_s": round(batch / floor_best), "step_ms": round(1e3 * floor_best, 1),
                         "median_step_ms": round(1e3 * statistics.median(all_floors), 1), "fraction_of_floor": 1.0}}
    fraction = {}
    for name, times in steps.items():
        fraction[name] = statistics.median(f / t for f, t in zip(floors[name], times))
        results[name] = {"tokens_per_s": round(batch / min(times)), "step_ms": round(1e3 * min(times), 1),
                         "median_step_ms": round(1e3 * statistics.median(times), 1),
                         "fraction_of_floor": round(fraction[name], 3),
                         "steps_ms": [round(1e3 * t, 1) for t in times]}

    def paired(slow: str, fast: str) -> float:
        return round(statistics.median(a / b for a, b in zip(steps[slow], steps[fast])), 2)

    speedups = {name: paired(name + "-dense", name) for name in args.variants}
    summary = {
        "how": "tokens_per_s and step_ms: best step; fraction_of_floor: median of adjacent floor/step pairs; "
               "speedups: median of adjacent step ratios",
        "default_topk_tokens_per_s": results["topk"]["tokens_per_s"],
        "default_topk_fraction_of_floor": results["topk"]["fraction_of_floor"],
        "speedup_over_dense_path": speedups,
        "default_topk_over_plain": paired("plain", "topk"),
    }
    if "sparsify" in steps:  # another process: compare load-normalised fractions of the floor, and best steps
        summary["default_topk_over_sparsify"] = {
            "by_fraction_of_floor": round(fraction["topk"] / fraction["sparsify"], 2),
            "by_best_step": round(min(steps["sparsify"]) / min(steps["topk"]), 2)}
    if "topk" in trainers:  # the CLI loop's histograms: from the sparse record, not from dense codes (as it once did)
        record = trainers["topk"].train_step({"x": data[0]})["sae"]

        def dense_histograms():
            codes = record.__missing__("_codes")  # rebuilt each call, as run.py reads a fresh record every step
            return (codes != 0).sum(0), (codes != 0).sum(-1)

        def sparse_histograms():
            return record.__missing__("_fired"), record.__missing__("_l0")

        summary["cli_loop_histograms_ms_per_step"] = {
            "from dense codes (how training/run.py once did it)": round(1e3 * statistics.median(
                time_steps(dense_histograms, 3, device) for _ in range(args.rounds)), 1),
            "record _fired / _l0 (sparse)": round(1e3 * statistics.median(
                time_steps(sparse_histograms, 3, device) for _ in range(args.rounds)), 2)}
    print(json.dumps({"results": results, "summary": summary}, indent=2), flush=True)
    profile = profile_default_step(p, data, args.profile_steps)
    print(json.dumps(profile, indent=2), flush=True)
    memory = [] if args.no_memory or device != "cpu" else peak_memory(args.preset, MEMORY_SIZES)
    report = {
        "benchmark": "train_throughput", "preset": args.preset, "d_in": d, "d_sae": n, "k": k, "batch": batch,
        "dtype": p["dtype"], "data": source, "threads": torch.get_num_threads(),
        "floor": "dense encoder forward, 2·d·n FLOP per token, one matmul timed in the same run",
        "matmul_flop_per_s": round(matmul_rate), "floor_tokens_per_s": round(batch / floor_best),
        "protocol": f"{args.rounds} interleaved rounds x {args.steps} step(s) per run, each after a floor matmul, "
                    f"after {args.warmup} warm-up steps; sparsify: {args.steps} step(s) per round in its venv",
        "cpu_topk_selection": kernels.describe(),
        "results": results, "summary": summary, "profile_default_topk": profile,
        "peak_memory_default_topk": memory,
        "sparsify": {"version": sparsify_version, "step": "its SparseCoder forward/backward, signum optimiser, "
                     "decoder renormalisation and gradient projection, dead-latent bookkeeping"}
        if sparsify_version else None,
        "load_average": {"before": [round(v, 2) for v in load_before],
                         "after": [round(v, 2) for v in os.getloadavg()]},
        "goal": "fast path >= 2x its dense path for every variant; default TopK >= 2x sparsify's own step "
                "(cpu preset)",
        "machine": describe_machine(device),
    }
    out = args.out or Path(f"bench/results/train_throughput_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"peak_memory_default_topk": memory, "load_average": report["load_average"]}, indent=2))


if __name__ == "__main__":
    main()
