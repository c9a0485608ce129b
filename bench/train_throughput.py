"""SAE training throughput (tokens/s) against the compute roofline and a plain PyTorch loop, in one run.

Three trainers take the same in-memory batches (cached activations when --cache is given, else Gaussian data of
the same shape; the reader is not what is measured here):
- `plain`: the textbook loop (encoder matmul, topk, scatter to dense codes, dense decode, MSE, Adam);
- `trainer-dense`: our Trainer with the TopK SAE (gradient projection, renormalisation, dead-latent counter, AuxK);
- `trainer-sparse`: the same with the sparse TopK path (saes/sparse_topk.py).
The roofline is the dense work of a step, 12·d·n FLOP per token, divided by the FLOP/s of a d x n matmul measured
in the same run and dtype. Presets: cpu (d=576, n=2304, k=32, batch 4096, fp32) and gpu (d=768, n=24576, bf16).

    python -m bench.train_throughput --preset cpu
    python -m bench.train_throughput --preset gpu    # on a CUDA machine
"""
import argparse
import json
import time
from pathlib import Path

import torch

from bench.machine import describe_machine
from saes import build_sae
from training.trainer import LoopConfig, Trainer

PRESETS = {"cpu": dict(d=576, n=2304, k=32, batch=4096, dtype="float32", device="cpu"),
           "gpu": dict(d=768, n=24576, k=32, batch=4096, dtype="bfloat16", device="cuda")}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Seconds per call, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def matmul_flops(d: int, n: int, batch: int, dtype: torch.dtype, device: str, steps: int) -> float:
    a = torch.randn(batch, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    return 2 * batch * d * n / timed(lambda: a @ b, steps, 3, device)


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


def our_trainer(d: int, n: int, k: int, data: list, device: str, sparse: bool, compile_: bool, autocast: bool):
    sae = build_sae("topk", d_in=d, d_sae=n, k=k, sparse_kernel=sparse).to(device)
    loop = LoopConfig(lr=1e-4, warmup_steps=1, dead_tokens=10 * len(data) * data[0].shape[0],
                      autocast="bf16" if autocast else "off", compile=compile_)
    trainer = Trainer({"sae": (sae, "x")}, loop, total_steps=10**9)
    state = {"i": 0}

    def step():
        trainer.train_step({"x": data[state["i"] % len(data)]})
        state["i"] += 1

    return step


def load_data(args, d: int, batch: int, device: str) -> tuple[list, str]:
    if args.cache:
        from training.activation_store import ActivationCache

        cache = ActivationCache(args.cache)
        hook = args.hook or cache.hooks[0]
        batches = [b.to(device) for _, b in zip(range(args.batches), cache.batches(hook, batch, seed=0))]
        return batches, f"cache {args.cache} ({hook})"
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, d, generator=generator).to(device) for _ in range(args.batches)], "gaussian"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--cache", type=Path, help="read batches from this activation cache")
    parser.add_argument("--hook")
    parser.add_argument("--compile", action="store_true", help="also time the trainer with torch.compile")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    d, n, k, batch, device = p["d"], p["n"], p["k"], p["batch"], p["device"]
    autocast = p["dtype"] == "bfloat16"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data, source = load_data(args, d, batch, device)
    peak = matmul_flops(d, n, batch, getattr(torch, p["dtype"]), device, max(args.steps, 10))
    runs = {"plain": plain_loop(d, n, k, data, device, autocast),
            "trainer-dense": our_trainer(d, n, k, data, device, False, False, autocast),
            "trainer-sparse": our_trainer(d, n, k, data, device, True, False, autocast)}
    if args.compile:
        runs["trainer-sparse-compiled"] = our_trainer(d, n, k, data, device, True, True, autocast)
    dense_flop_per_token = 12 * d * n
    results = {}
    for name, step in runs.items():
        seconds = timed(step, args.steps, args.warmup, device)
        tokens_per_s = batch / seconds
        results[name] = {"tokens_per_s": round(tokens_per_s),
                         "fraction_of_roofline": round(tokens_per_s * dense_flop_per_token / peak, 3)}
    for name in results:
        results[name]["ratio_to_plain"] = round(results[name]["tokens_per_s"] / results["plain"]["tokens_per_s"], 2)
    report = {"benchmark": "train_throughput", "preset": args.preset, "d_in": d, "d_sae": n, "k": k, "batch": batch,
              "dtype": p["dtype"], "data": source, "matmul_flop_per_s": round(peak),
              "dense_flop_per_token": dense_flop_per_token, "results": results,
              "goal": "1.5M tokens/s on an H100/H200-class GPU (gpu preset)", "machine": describe_machine(device)}
    out = args.out or Path(f"bench/results/train_throughput_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
