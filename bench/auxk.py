"""AuxK on the fast path, forward + backward, ranked over the dead columns alone (the CPU default) against all
latents with the live ones masked to -inf (the sync-free ranking the fast path uses on GPUs), at the training
benchmark's shape (batch 4096, d_in 576, d_sae 2304, aux_k = d_in / 2 = 288, fp32, 2 threads).

The masked ranking always decodes min(aux_k, n) pairs per token and zeroes the live ones, so with few or no dead
latents it does the full work for a term that is mostly or exactly 0; the dead-column ranking decodes only
min(aux_k, n_dead) pairs and skips the term when no latent is dead. Both give ops.auxk_loss's value and gradients
(tests/saes/test_fast_path.py). Rounds are interleaved; reported: best and median ms and the median per-round ratio.

    python -m bench.auxk [--rounds 7] [--out bench/results/auxk.json]
"""
import argparse
import json
import os
from pathlib import Path

import torch

from bench.cpu_kernels import compare
from bench.machine import describe_machine
from saes import sparse_topk as fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/auxk.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, d_in, d_sae = 4096, 576, 2304
    aux_k = d_in // 2
    generator = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(d_sae, d_in, generator=generator) / d_in**0.5).requires_grad_()
    W_dec = (torch.randn(d_sae, d_in, generator=generator) / d_in**0.5).requires_grad_()
    b_enc, b_dec = torch.zeros(d_sae, requires_grad=True), torch.zeros(d_in, requires_grad=True)
    x, residual = torch.randn(batch, d_in, generator=generator), torch.randn(batch, d_in, generator=generator)
    x_centered, pre_acts = fast.encoder_pre_acts(x, b_dec, W_enc, b_enc)
    load_before = os.getloadavg()

    def step(mask: torch.Tensor, dead_columns: bool) -> None:
        loss = fast.fast_auxk(pre_acts, x_centered, residual, b_dec, W_enc, b_enc, W_dec, mask, aux_k,
                              dead_columns=dead_columns)
        if loss.requires_grad:
            loss.backward()

    results = {}
    for dead_fraction in (0.0, 0.05, 0.3):
        mask = torch.rand(d_sae, generator=generator) < dead_fraction
        results[f"{dead_fraction:.0%} dead ({int(mask.sum())} latents)"] = compare(
            lambda m=mask: step(m, True), lambda m=mask: step(m, False), args.rounds, names=("dead_columns", "masked"))
    report = {"benchmark": "auxk", "shape": {"batch": batch, "d_in": d_in, "d_sae": d_sae, "aux_k": aux_k},
              "threads": args.threads, "rounds": args.rounds, "results": results,
              "load_average": {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]},
              "command": "python -m bench.auxk", "machine": describe_machine("cpu")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
