"""The feature store's one pass over the cache (`saewb features`) against reading the cache alone and against
encoding alone, in the same run, at a production width (d_sae = 24,576 by default).

The SAE is a TopK SAE with random weights (the pass costs the same for trained ones: the same k latents fire per
token), over the demo cache (or any cache folder). Three timings over the same shards:
  read   - the cache read alone (tokens, activations and keep mask of each shard, checksums verified);
  encode - read plus the SAE's encoder on every batch (the floor of any pass that needs the codes);
  store  - the whole `collect` pass (codes, top contexts, quantile samples, histograms, density).

    python -m bench.feature_store [--cache FOLDER] [--d-sae 24576] [--shards 2]
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def demo_cache() -> Path:
    path = ROOT / "runs" / "demo" / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make demo` first, or pass --cache FOLDER.")
    return Path(json.loads(path.read_text())["cache"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="an activation cache folder (default: the demo run's)")
    parser.add_argument("--hook", help="the cached hook (default: the cache's first)")
    parser.add_argument("--d-sae", type=int, default=24_576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--shards", type=int, default=2, help="shards timed (the pass is linear in them)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "feature_store.json")
    args = parser.parse_args()
    from analysis.features import FeaturesConfig, collect
    from saes import build_sae
    from training.activation_store import ActivationCache

    cache = ActivationCache(args.cache or demo_cache())
    hook = args.hook or cache.hooks[0]
    shards = list(range(min(args.shards, cache.n_shards)))
    torch.manual_seed(0)
    sample = cache.read(0, f"acts.{hook}")
    sae = build_sae("topk", d_in=sample.shape[1], d_sae=args.d_sae, k=args.k).requires_grad_(False)
    sae.init_b_dec(sample[:4096])
    n_tokens = sum(cache.manifest["shards"][i]["contexts"] for i in shards) * cache.context_length

    def read_all(encode: bool) -> float:
        started = time.perf_counter()
        for index in shards:
            cache.tokens(index)
            acts = cache.read(index, f"acts.{hook}")
            cache.keep_mask(index, hook)
            if encode:
                with torch.no_grad():
                    for start in range(0, len(acts), args.batch_size):
                        sae.encode(acts[start:start + args.batch_size])
        return time.perf_counter() - started

    read_all(False)  # warm the page cache, so the read is timed from memory as in the pass
    read_s = read_all(False)
    encode_s = read_all(True)
    cfg = FeaturesConfig(run_dir=Path("."), max_shards=len(shards), batch_size=args.batch_size, progress=False)
    started = time.perf_counter()
    with torch.no_grad():
        collect(sae, cache, hook, cfg)
    store_s = time.perf_counter() - started
    result = {
        "benchmark": "feature_store", "cache": str(cache.path),
        "hook": hook, "d_in": sample.shape[1], "d_sae": args.d_sae, "k": args.k, "tokens": n_tokens,
        "batch_size": args.batch_size,
        "read_tokens_per_s": round(n_tokens / read_s), "encode_tokens_per_s": round(n_tokens / encode_s),
        "store_tokens_per_s": round(n_tokens / store_s),
        "store_over_read": round(read_s / store_s, 4), "store_over_encode": round(encode_s / store_s, 3),
        "load_average": os.getloadavg(), "machine": describe_machine("cpu"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
