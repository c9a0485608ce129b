"""Caching throughput against a bare forward pass of the same model to the same layer, in the same run.

The baseline is the plain Hugging Face model truncated to the hooked layer (no TransformerLens, no hooks, no
disk): the least work that produces these activations. The cached figure is the whole `cache_activations` job
(hooks, mask, norms, safetensors shards, checksums) on the same contexts. Goal: ratio >= 0.95.

    python bench/cache_throughput.py [--model smollm2] [--layer 15] [--tokens 32768] [--dtype bfloat16]
"""
import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from training.caching import DTYPES, CacheConfig, cache_activations  # noqa: E402
from training.corpus import token_contexts  # noqa: E402
from training.model import load_model, model_path  # noqa: E402


def bare_forward_tokens_per_second(model_dir: str, contexts: torch.Tensor, layer: int, batch: int, dtype: str,
                                   device: str) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    hf.model.layers = hf.model.layers[: layer + 1]  # stop at the hooked layer
    hf.model.norm = torch.nn.Identity()
    with torch.no_grad():
        hf.model(contexts[:batch].to(device))  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(contexts), batch):
            out = hf.model(contexts[i:i + batch].to(device)).last_hidden_state
            out.cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return contexts.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="the cache's own default; bf16 matmuls are very slow on CPUs without native bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cache_throughput.json"))
    args = parser.parse_args()

    hook = f"blocks.{args.layer}.hook_resid_post"
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    n_contexts = args.tokens // args.context_length
    contexts = token_contexts(model.tokenizer, "austen", args.context_length, n_contexts)
    bare = bare_forward_tokens_per_second(model_path(args.model), contexts, args.layer, args.batch_size, args.dtype,
                                          args.device)
    folder = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        cfg = CacheConfig(model=args.model, hooks=[hook], tokens=args.tokens, context_length=args.context_length,
                          dtype=args.dtype, batch_size=args.batch_size, device=args.device, out=folder / "c")
        start = time.perf_counter()
        cache_activations(cfg, model=model, progress=False)
        cached = args.tokens / (time.perf_counter() - start)  # includes tokenising the corpus slice
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "benchmark": "cache_throughput", "model": args.model, "hook": hook, "tokens": args.tokens,
        "context_length": args.context_length, "batch_size": args.batch_size, "dtype": args.dtype,
        "device": args.device, "bare_forward_tokens_per_s": round(bare), "cache_tokens_per_s": round(cached),
        "ratio_cache_to_bare": round(cached / bare, 3), "goal_ratio": 0.95, "machine": describe_machine(args.device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
