"""Write an activation cache: run the hooked model over a corpus and store activations shard by shard.

Resumable: each shard is written to a temporary name, renamed, and recorded with its checksum in
`progress.json`; a rerun of the same command skips recorded shards. The manifest is written last. The folder is
locked while it is written, so two commands caching the same key never interleave shards.
"""
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from training import activation_store as store
from training.corpus import special_token_ids, token_contexts
from training.model import EMBEDDED, canonical_name, check_hooks, describe, load_model, model_fingerprint, stop_layer
from training.paths import cache_root

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheConfig:
    """Which activations to cache. Everything but `out`, `device`, `batch_size` and `outlier_factor` goes into the key."""

    model: str = EMBEDDED
    """Model: 'smollm2' (embedded SmolLM2-135M), 'tiny' (random 2-layer test model) or a TransformerLens/HF name."""
    hooks: list[str] = field(default_factory=list)
    """Hook points to cache, all in one model pass (e.g. blocks.6.hook_resid_post blocks.6.attn.hook_z); default the
    residual stream after the model's middle block (blocks.15.hook_resid_post for smollm2, blocks.1 for tiny)."""
    corpus: str = "austen"
    """Text: 'austen' (embedded), a .txt/.parquet/.jsonl path or folder, hf:DATASET[:CONFIG][:SPLIT], or a circuit
    task's prompts with answers as task data: task:ioi, task:greater_than, task:sva."""
    text_column: str = "text"
    """Column holding the text in parquet/jsonl/HF datasets."""
    tokens: int = 200_000
    """Tokens to cache (rounded up to whole contexts)."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in; activations are stored in it too."""
    gradients: bool = False
    """Also store the gradient of the summed next-token loss w.r.t. each hooked activation (for g-SAE); runs the
    whole model forward and backward."""
    shard_tokens: int = 65_536
    """Tokens per shard file (rounded down to whole contexts)."""
    outlier_factor: float = 10.0
    """Tokens whose norm exceeds this many times the median norm are left out of training batches (0 keeps all)."""
    batch_size: int = 16
    """Contexts per model forward."""
    device: str = "cpu"
    """Torch device for the model, e.g. cpu or cuda."""
    out: Path | None = None
    """Cache folder; default ~/.cache/saewb/activations/<key> (content-addressed)."""

    def key_fields(self, tokenizer_name: str) -> dict:
        return {
            "model": model_fingerprint(self.model), "hooks": list(self.hooks), "corpus": self.corpus,
            "text_column": self.text_column, "tokens": self.n_contexts * self.context_length,
            "context_length": self.context_length, "tokenizer": tokenizer_name, "dtype": self.dtype,
            "gradients": self.gradients, "shard_tokens": self.contexts_per_shard * self.context_length,
            "special_tokens": "bos-first-then-eos-separated; special ids masked",
            "tokenisation": "paragraph-pieces-v1",
        }

    @property
    def n_contexts(self) -> int:
        return math.ceil(self.tokens / self.context_length)

    @property
    def contexts_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.context_length)

    def resolve_hooks(self, n_layers: int | None = None) -> None:
        """Fill in the default hook (the middle block's resid_post) when none was given; `n_layers` from a loaded
        model, else read from the model's config without loading it."""
        if not self.hooks:
            self.hooks = [default_hook(n_layers or model_layers(self.model))]

    def validate(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}.")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}.")
        self.resolve_hooks()
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"--hooks lists a hook twice: {self.hooks}.")


def default_hook(n_layers: int) -> str:
    """The residual stream after the middle block: the hook a model is cached at unless told otherwise."""
    return f"blocks.{n_layers // 2}.hook_resid_post"


def model_layers(name: str) -> int:
    """A model's layer count without loading its weights: known for smollm2 and tiny, else its config.json."""
    from training.model import TINY, load_config

    name = canonical_name(name)
    if name == EMBEDDED:
        return 30
    if name == TINY:
        return 2
    return load_config(name)["n_layers"]


def default_folder(cfg: CacheConfig, key_fields: dict) -> Path:
    return Path(cfg.out) if cfg.out is not None else cache_root() / "activations" / store.cache_key(key_fields)


def hooked_forward(model, tokens: torch.Tensor, hooks: list[str], gradients: bool):
    """Activations (and gradients) of one batch of contexts: {hook: [batch*ctx, d]} for each."""
    if not gradients:
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, names_filter=hooks, stop_at_layer=stop_layer(hooks, model.cfg.n_layers))
        return {h: cache[h].reshape(tokens.numel(), -1) for h in hooks}, None
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def fn(act, hook):
            if not act.requires_grad:  # parameters are frozen: the earliest hook becomes the graph's leaf
                act = act.detach().requires_grad_(True)
            captured[name] = act
            return act
        return fn

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(h, capture(h)) for h in hooks])
        log_probs = logits.float().log_softmax(-1)[:, :-1]  # [batch, ctx-1, vocab]
        loss = -log_probs.gather(-1, tokens[:, 1:, None]).sum()
        grads = torch.autograd.grad(loss, [captured[h] for h in hooks])
    acts = {h: captured[h].detach().reshape(tokens.numel(), -1) for h in hooks}
    return acts, {h: g.reshape(tokens.numel(), -1) for h, g in zip(hooks, grads)}


def check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(
            f"Caching needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at {folder}: free space, "
            "ask for fewer --tokens, or set SAEWB_CACHE (or --out) to a larger disk."
        )


def read_state(path: Path) -> dict:
    """progress.json or manifest.json as written by this module; one sentence when it is unreadable."""
    if path.name == store.MANIFEST:
        return store.read_manifest(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise store.CacheError(f"{path} is not valid JSON (edited by hand?): delete the folder {path.parent} and run "
                               "the same `saewb cache` command again.") from None


def check_key(folder: Path, key_fields: dict) -> None:
    """A folder already holding (part of) a cache with other key fields is refused."""
    for path in (folder / store.MANIFEST, folder / store.PROGRESS):
        if path.is_file():
            found = read_state(path)["key_fields"]
            if found != key_fields:
                changed = sorted(k for k in set(key_fields) | set(found) if found.get(k) != key_fields.get(k))
                listed = "; ".join(f"{k} {found.get(k)!r} there, {key_fields.get(k)!r} asked" for k in changed)
                raise store.CacheError(
                    f"{folder} holds a cache written with different {', '.join(changed)} ({listed}): use another "
                    "--out folder or delete this one."
                )


def finished_at_out(cfg: CacheConfig) -> Path | None:
    """The --out folder when it already holds a finished cache of `cfg` (every key field equal; the tokenizer, which
    only the loaded model tells, is the one the model fingerprint implies): then no model needs loading."""
    if cfg.out is None or not (Path(cfg.out) / store.MANIFEST).is_file():
        return None
    manifest = read_state(Path(cfg.out) / store.MANIFEST)
    found = manifest["key_fields"]
    return Path(cfg.out) if found == cfg.key_fields(tokenizer_name=found.get("tokenizer")) else None


def verified(folder: Path) -> Path:
    """A finished cache folder after checking every shard against its sha256 (CacheError naming a bad one)."""
    cache = store.ActivationCache(folder)
    for index in range(cache.n_shards):
        cache._check(index)
    return folder


def cache_activations(cfg: CacheConfig, model=None, progress: bool = True, verify: bool = False) -> Path:
    """Create (or finish) the cache described by `cfg` and return its folder; with `verify`, a cache found finished
    has every shard's checksum checked first (training checks each shard as it reads it anyway).

    The folder is locked while shards are written: a second writer of the same cache waits, then finds it finished
    (or continues it where a killed one stopped); a finished cache is read without the lock."""
    cfg.model = canonical_name(cfg.model)
    if model is not None:
        cfg.resolve_hooks(model.cfg.n_layers)
    cfg.validate()
    if model is None and (done_folder := finished_at_out(cfg)) is not None:
        return verified(done_folder) if verify else done_folder
    model = model or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    check_hooks(model, cfg.hooks)
    key_fields = cfg.key_fields(tokenizer_name=f"{type(model.tokenizer).__name__}:{len(model.tokenizer)}")
    folder = default_folder(cfg, key_fields)
    manifest_path, progress_path = folder / store.MANIFEST, folder / store.PROGRESS
    check_key(folder, key_fields)
    if manifest_path.is_file():
        return verified(folder) if verify else folder
    contexts = token_contexts(model.tokenizer, cfg.corpus, cfg.context_length, cfg.n_contexts, cfg.text_column)
    special_ids = torch.tensor(special_token_ids(model.tokenizer))
    n_shards = math.ceil(cfg.n_contexts / cfg.contexts_per_shard)
    probe, _ = hooked_forward(model, contexts[:1].to(cfg.device), cfg.hooks, gradients=False)
    width = sum(a.shape[-1] for a in probe.values())  # floats per token over all hooks
    per_token = width * DTYPES[cfg.dtype].itemsize * (2 if cfg.gradients else 1) + 4 * len(cfg.hooks) + 5
    done = len(read_state(progress_path)["shards"]) if progress_path.is_file() else 0
    check_disk(folder, int(1.1 * per_token * (cfg.n_contexts - done * cfg.contexts_per_shard) * cfg.context_length))
    with store.folder_lock(folder, waiting_message=f"saewb: waiting for {{holder}}, which is writing the cache {folder}"
                                                   "; this command continues when it is done."):
        check_key(folder, key_fields)  # the other writer may have finished it meanwhile
        if manifest_path.is_file():
            return folder
        for stale in folder.glob(".shard_*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        state = read_state(progress_path) if progress_path.is_file() else {"key_fields": key_fields, "shards": []}
        done = len(state["shards"])
        if done and progress:
            tqdm.write(f"saewb: resuming the cache {folder} from shard {done} of {n_shards}")
        store.write_json_atomic(progress_path, state)
        with tqdm(total=cfg.n_contexts * cfg.context_length,
                  initial=done * cfg.contexts_per_shard * cfg.context_length, unit="tok", unit_scale=True,
                  desc=f"cache {cfg.model}", disable=not progress, dynamic_ncols=True) as bar:  # closed before errors
            # One writer thread: shard i is written and hashed while the model computes shard i+1 (torch, the
            # safetensors write and hashlib all release the GIL). progress.json lists a shard only once it is on disk.
            # An interruption still records the shard being written, so no finished work is lost.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
                pending = None
                try:
                    for index in range(done, n_shards):
                        rows = contexts[index * cfg.contexts_per_shard:(index + 1) * cfg.contexts_per_shard]
                        tensors = shard_tensors(model, rows, cfg, special_ids, bar)
                        if pending is not None:
                            finished, pending = pending, None
                            record_shard(state, progress_path, finished.result())
                        pending = writer.submit(write_and_hash, tensors, folder / store.shard_name(index), index,
                                                len(rows))
                finally:
                    if pending is not None:
                        record_shard(state, progress_path, pending.result())
        store.failpoint("cache.before_manifest")
        finalise(folder, state, cfg, model)
    return folder


def write_and_hash(tensors: dict, path: Path, done: int, contexts: int) -> dict:
    """Write a shard (atomically) and return its progress entry with the sha256 of what is on disk."""
    write_shard(tensors, path, done=done)
    store.failpoint("cache.shard_renamed")  # tests: a shard on disk that progress.json does not list yet
    return {"file": path.name, "sha256": store.file_sha256(path), "contexts": contexts}


def record_shard(state: dict, progress_path: Path, entry: dict) -> None:
    state["shards"].append(entry)
    store.write_json_atomic(progress_path, state)


def write_shard(tensors: dict, path: Path, done: int) -> None:
    """Write one shard under a temporary name and rename it into place; a failed write leaves no partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp))
        tmp.replace(path)
    except (OSError, SafetensorError) as error:
        tmp.unlink(missing_ok=True)
        kept = f"the {done} finished shard(s) are kept" if done else "no shard was finished yet"
        raise store.write_error(error, path, f"{kept}; free space in {path.parent} (or point SAEWB_CACHE / --out at "
                                             "a larger disk) and run the same command again to continue") from None


def shard_tensors(model, rows: torch.Tensor, cfg: CacheConfig, special_ids: torch.Tensor, bar) -> dict:
    """All tensors of one shard (see activation_store's docstring for the names and shapes)."""
    acts = {h: [] for h in cfg.hooks}
    grads = {h: [] for h in cfg.hooks}
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start:start + cfg.batch_size].to(cfg.device)
        batch_acts, batch_grads = hooked_forward(model, batch, cfg.hooks, cfg.gradients)
        for h in cfg.hooks:
            acts[h].append(batch_acts[h].cpu())
            if batch_grads is not None:
                grads[h].append(batch_grads[h].to(batch_acts[h].dtype).cpu())
        bar.update(batch.numel())
    tensors = {"tokens": rows.to(torch.int32).contiguous(),
               "special": torch.isin(rows, special_ids).to(torch.uint8).contiguous()}
    for h in cfg.hooks:
        a = torch.cat(acts[h])
        tensors[f"acts.{h}"] = a.contiguous()
        tensors[f"norms.{h}"] = a.float().norm(dim=-1).contiguous()
        if cfg.gradients:
            tensors[f"grads.{h}"] = torch.cat(grads[h]).contiguous()
    return tensors


def finalise(folder: Path, state: dict, cfg: CacheConfig, model) -> None:
    """Statistics over all shards, then the manifest (atomically, last)."""
    stats = {}
    shards = [folder / entry["file"] for entry in state["shards"]]
    for h in cfg.hooks:
        norms, special, d = [], [], None
        for path in shards:
            with safe_open(str(path), framework="pt") as handle:
                norms.append(handle.get_tensor(f"norms.{h}"))
                special.append(handle.get_tensor("special").reshape(-1).bool())
                d = handle.get_slice(f"acts.{h}").get_shape()[-1]
        norms_all, special_all = torch.cat(norms), torch.cat(special)
        regular = norms_all[~special_all]
        median = regular.median().item()
        outlier = (~special_all) & (norms_all > cfg.outlier_factor * median) if cfg.outlier_factor > 0 else \
            torch.zeros_like(special_all)
        kept = norms_all[~special_all & ~outlier]
        stats[h] = {
            "d": d, "n_tokens": len(norms_all), "n_special": int(special_all.sum()), "n_outliers": int(outlier.sum()),
            "n_kept": len(kept), "median_norm": median, "mean_norm": kept.mean().item(),
            "max_norm": norms_all.max().item(), "special_mean_norm": norms_all[special_all].mean().item()
            if special_all.any() else None,
            "dataset_scalar": math.sqrt(d) / kept.mean().item(),
        }
    manifest = {
        "format_version": store.FORMAT_VERSION, "key": folder.name, "key_fields": state["key_fields"],
        "model_name": cfg.model, "model": describe(model) | {"tokenizer": state["key_fields"]["tokenizer"]},
        "d_model": model.cfg.d_model, "dtype": cfg.dtype, "context_length": cfg.context_length,
        "n_contexts": sum(entry["contexts"] for entry in state["shards"]), "outlier_factor": cfg.outlier_factor,
        "shards": state["shards"], "stats": stats, "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    manifest["checksum"] = store.manifest_checksum(manifest)
    store.write_json_atomic(folder / "config.json", manifest["config"])
    store.write_json_atomic(folder / store.MANIFEST, manifest)  # last: the folder's "finished" mark
