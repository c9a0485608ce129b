"""The compiled CPU kernels of the fast training path (saes/kernels) against the torch ops they replace, in one run,
at the training benchmark's shape (batch 4096, d_in 576, d_sae 2304, k 32, fp32, 2 threads):

  top-k        - `topk_last_dim` vs torch.topk(sorted=True) on [batch, d_sae] pre-activations;
  decode_error - the fused decode, squared error and FVU denominator, forward + backward, vs the same autograd
                 Function on its torch path (embedding_bag decode, norms, per-pair dots in the backward);
  latent plan  - the counting sort of the selected pairs by latent vs the stable torch sort + searchsorted;
  latent_sum   - the backward's per-latent sums (W_enc's and W_dec's gradients) vs embedding_bag over the same plan,
                 on a selection of Gaussian scores (latents about equally frequent) and on one with heavy-tailed
                 latent frequencies, as a trained SAE has (column offsets -0.3 log(1 + j): the first half of the
                 latents gets about 79 % of the entries; 77 % in bench/peers.py's planted-dictionary run), where
                 embedding_bag's equal split of latents between threads leaves one thread most of the work;
  batch top-k  - not a compiled kernel: ops.batch_topk_positions (BatchTopK's k * batch largest of all batch x d_sae
                 pre-activations, through a sampled threshold) vs torch.topk over the flattened scores.

Each pair runs interleaved over --rounds rounds (so load affects both alike); reported: best and median ms of each,
and the median of the per-round ratios.

    python -m bench.cpu_kernels [--rounds 15] [--out bench/results/cpu_kernels.json]

Not named bench/kernels.py: bench/peers.py, run as a script, puts this folder on sys.path, where a kernels.py would
shadow the `kernels` package that transformers probes for and break sparsify's import.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.machine import describe_machine
from saes import kernels, ops
from saes import sparse_topk as fast


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    return {"best": round(1e3 * min(seconds), 2), "median": round(1e3 * statistics.median(seconds), 2)}


def compare(first, second, rounds: int, names: tuple[str, str] = ("compiled", "torch")) -> dict:
    """Both functions interleaved over `rounds` rounds after one warm-up call each: best and median ms of each, and
    the median over rounds of second / first (how many times faster `first` is)."""
    first(), second()
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(first))
        b.append(timed(second))
    return {f"{names[0]}_ms": summary(a), f"{names[1]}_ms": summary(b),
            "speedup_median_of_rounds": round(statistics.median(y / x for x, y in zip(a, b)), 2)}


def without_kernels(fn):
    """fn with every kernel lookup answering None (the torch path)."""
    def run():
        saved_for, saved_load = kernels.for_tensor, kernels.load
        kernels.for_tensor, kernels.load = (lambda tensor: None), (lambda verbose=False: None)
        try:
            return fn()
        finally:
            kernels.for_tensor, kernels.load = saved_for, saved_load
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_kernels.json"))
    args = parser.parse_args()
    module = kernels.load()
    if module is None:
        raise SystemExit(f"bench.cpu_kernels: the compiled kernels are not built ({kernels.unavailable_reason()}); "
                         "run `python -m saes.kernels` first.")
    torch.set_num_threads(args.threads)
    batch, d_in, d_sae, k = 4096, 576, 2304, 32
    generator = torch.Generator().manual_seed(0)
    pre_acts = torch.randn(batch, d_sae, generator=generator)
    W_dec = torch.randn(d_sae, d_in, generator=generator) / d_in**0.5
    target = torch.randn(batch, d_in, generator=generator)
    selection = fast.Selection.topk(pre_acts, k)
    values = selection.gather(pre_acts).relu()
    load_before = os.getloadavg()

    def error_step():
        v, w = values.clone().requires_grad_(), W_dec.clone().requires_grad_()
        fresh = fast.Selection.per_token(selection.indices, d_sae)  # no plan cached between calls
        sq, _, _ = fast.decode_error(v, w, fresh, target, center=target.mean(0))
        sq.backward()

    def plan(selection_cls=fast.Selection):
        return selection_cls.per_token(selection.indices, d_sae).plan()

    rows = torch.randn(batch, d_in, generator=generator)
    skewed = fast.Selection.topk(pre_acts - 0.3 * torch.arange(1, d_sae + 1).log(), k)

    def latent_sums(chosen: fast.Selection):
        p = chosen.plan()
        weights = torch.randn(p.tokens.shape, generator=generator)
        return (lambda: module.latent_sum(rows, p.tokens, p.offsets, weights),
                lambda: torch.nn.functional.embedding_bag(p.tokens, rows, p.offsets, per_sample_weights=weights,
                                                          mode="sum"))

    skewed_plan = skewed.plan()
    first_half = float(skewed_plan.offsets[d_sae // 2]) / skewed_plan.tokens.numel()
    results = {
        "top-k": compare(lambda: module.topk_last_dim(pre_acts, k),
                         lambda: pre_acts.topk(k, dim=-1, sorted=True), args.rounds),
        "decode_error forward + backward": compare(error_step, without_kernels(error_step), args.rounds),
        "latent plan": compare(plan, without_kernels(plan), args.rounds),
        "latent_sum, Gaussian scores": compare(*latent_sums(selection), args.rounds, ("compiled", "embedding_bag")),
        "latent_sum, heavy-tailed latents": compare(*latent_sums(skewed), args.rounds, ("compiled", "embedding_bag")),
        "batch top-k": compare(lambda: ops.batch_topk_positions(pre_acts, k * batch),
                               lambda: pre_acts.flatten().topk(k * batch, sorted=False), args.rounds,
                               ("sampled_threshold", "torch.topk")),
    }
    results["latent_sum, heavy-tailed latents"]["entries_in_first_half_of_latents"] = round(first_half, 3)
    report = {"benchmark": "cpu_kernels", "shape": dict(batch=batch, d_in=d_in, d_sae=d_sae, k=k, dtype="float32"),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "kernels": kernels.describe(),
              "results": results,
              "note": "decode_error includes its backward (W_dec's gradient: latent_sum in the compiled arm, "
                      "embedding_bag in the torch arm, each on its arm's plan); each torch arm is the same code with "
                      "the kernels switched off",
              "load_average": {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]},
              "machine": describe_machine("cpu")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
