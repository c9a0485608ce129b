"""The on-disk activation cache: format, manifest, checksums and the shuffled minibatch reader.

A cache is a content-addressed folder `<root>/activations/<key>/`:
- `shard_00000.safetensors` ...: `tokens` [contexts, ctx] int32, `special` [contexts, ctx] uint8 (BOS/EOS/pad),
  and per hook `acts.<hook>` [contexts*ctx, d] (store dtype), `norms.<hook>` [contexts*ctx] float32 and
  optionally `grads.<hook>` [contexts*ctx, d] (gradient of the summed next-token loss w.r.t. the activation).
- `progress.json`: shards finished so far with their sha256 (what a resumed run continues from).
- `manifest.json`: written last, atomically; a folder without it is incomplete and never read as valid.
Training batches exclude special tokens and outlier-norm tokens (norm > outlier_factor x the median norm).
"""
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def cache_key(fields: dict) -> str:
    """sha256 of the fields that determine the content, as canonical JSON."""
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message says how to fix it."""


class ActivationCache:
    """Read side of a finished cache. Verifies shard checksums on first use of each shard."""

    def __init__(self, path: str | Path, *, model: str | None = None, hook: str | None = None, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = " (it is incomplete: run the same `saewb cache` command again to finish it)" if (
                self.path / PROGRESS).is_file() else ""
            raise CacheError(f"{self.path} is not a finished activation cache{hint}.")
        self.manifest = json.loads(manifest_path.read_text())
        self.verify = verify
        self._verified: set[int] = set()
        if model is not None and self.manifest["key_fields"]["model"] != model:
            raise CacheError(
                f"Cache {self.path} was written for model {self.manifest['key_fields']['model']!r}, not {model!r}: "
                "point at a cache of this model or run `saewb cache` for it."
            )
        if hook is not None:
            self.check_hook(hook)

    # ---- facts ----------------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["key_fields"]["hooks"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def context_length(self) -> int:
        return self.manifest["key_fields"]["context_length"]

    @property
    def has_grads(self) -> bool:
        return bool(self.manifest["key_fields"]["gradients"])

    def d_in(self, hook: str) -> int:
        """Width of one token's activation at `hook` (d_model for the residual stream)."""
        return self.stats(hook)["d"]

    def stats(self, hook: str) -> dict:
        return self.manifest["stats"][hook]

    def check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise CacheError(
                f"Cache {self.path} holds hooks {self.hooks}, not {hook!r}: pick one of those or cache {hook!r}."
            )

    # ---- shards ---------------------------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        return self.path / self.manifest["shards"][index]["file"]

    def _check(self, index: int) -> None:
        if not self.verify or index in self._verified:
            return
        entry = self.manifest["shards"][index]
        path = self.path / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise CacheError(
                f"Shard {path} is missing or corrupted (checksum mismatch): delete the folder {self.path} and run "
                "`saewb cache` again."
            )
        self._verified.add(index)

    def read(self, index: int, name: str) -> torch.Tensor:
        """One tensor of one shard (memory-mapped by safetensors, copied out)."""
        self._check(index)
        with safe_open(str(self.shard_path(index)), framework="pt") as handle:
            return handle.get_tensor(name)

    def tokens(self, index: int) -> torch.Tensor:
        """Token ids of a shard's contexts: [contexts, ctx]."""
        return self.read(index, "tokens").long()

    def keep_mask(self, index: int, hook: str, outlier_factor: float | None = None) -> torch.Tensor:
        """Tokens that go into training batches: not special and norm <= factor x median norm. [contexts*ctx]."""
        factor = self.manifest["outlier_factor"] if outlier_factor is None else outlier_factor
        special = self.read(index, "special").reshape(-1).bool()
        norms = self.read(index, f"norms.{hook}")
        keep = ~special
        if factor and factor > 0:
            keep &= norms <= factor * self.stats(hook)["median_norm"]
        return keep

    def shard_tokens(self, index: int, hook: str, *, grads: bool = False, outlier_factor: float | None = None):
        """Kept activations of one shard [n, d] (float32), with gradients [n, d] when asked."""
        keep = self.keep_mask(index, hook, outlier_factor)
        acts = self.read(index, f"acts.{hook}")[keep].float()
        if not grads:
            return acts
        if not self.has_grads:
            raise CacheError(f"Cache {self.path} has no gradients: run `saewb cache ... --gradients` for g-SAE.")
        return acts, self.read(index, f"grads.{hook}")[keep].float()

    # ---- minibatches ----------------------------------------------------------------------------------
    def batches(
        self, hook: str | list[str], batch_size: int, *, seed: int = 0, buffer_tokens: int = 262_144,
        shards: list[int] | None = None, grads: bool = False, epochs: int = 1, outlier_factor: float | None = None,
    ) -> Iterator:
        """Shuffled minibatches through a bounded shuffle buffer; deterministic for a seed.

        One hook gives tensors [batch_size, d] (or (x, grad) pairs with grads=True); a list of hooks gives dicts
        {hook: ...} built from the same tokens (kept in every hook), so the data is read once for all of them.
        Shards are visited in a seeded random order and appended to a buffer of at most about `buffer_tokens`
        plus one shard; whenever it is full it is shuffled and its first half is emitted. Memory stays bounded
        whatever the cache size. Each epoch gives floor(kept tokens / batch_size) batches.
        """
        hooks = [hook] if isinstance(hook, str) else list(hook)
        for h in hooks:
            self.check_hook(h)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        widths = [self.d_in(h) * (2 if grads else 1) for h in hooks]
        generator = torch.Generator().manual_seed(seed)
        shard_ids = list(range(self.n_shards)) if shards is None else list(shards)

        def unpack(chunk: torch.Tensor):
            parts = {}
            for h, part in zip(hooks, chunk.split(widths, dim=1)):
                parts[h] = part.split(self.d_in(h), dim=1) if grads else part
            return parts[hook] if isinstance(hook, str) else parts

        for _ in range(epochs):
            buffer: list[torch.Tensor] = []  # rows are tokens; columns: each hook's acts (and grads)
            size = 0
            for position in torch.randperm(len(shard_ids), generator=generator).tolist():
                data = self.shard_rows(shard_ids[position], hooks, grads=grads, outlier_factor=outlier_factor)
                buffer.append(data)
                size += len(data)
                if size >= buffer_tokens:
                    pool = torch.cat(buffer)[torch.randperm(size, generator=generator)]
                    emit = (size // 2) // batch_size * batch_size
                    for start in range(0, emit, batch_size):
                        yield unpack(pool[start:start + batch_size])
                    buffer, size = [pool[emit:]], size - emit
            if size:
                pool = torch.cat(buffer)[torch.randperm(size, generator=generator)]
                for start in range(0, size // batch_size * batch_size, batch_size):
                    yield unpack(pool[start:start + batch_size])

    def shard_rows(self, index: int, hooks: list[str], *, grads: bool = False,
                   outlier_factor: float | None = None) -> torch.Tensor:
        """Tokens of one shard kept in every hook, as rows [n, sum of widths] (acts, then grads, per hook)."""
        keep = self.joint_keep_mask(index, hooks, outlier_factor)
        columns = []
        for h in hooks:
            columns.append(self.read(index, f"acts.{h}")[keep].float())
            if grads:
                if not self.has_grads:
                    raise CacheError(f"Cache {self.path} has no gradients: run `saewb cache ... --gradients` for g-SAE.")
                columns.append(self.read(index, f"grads.{h}")[keep].float())
        return torch.cat(columns, dim=1)

    def n_batches(self, hooks: list[str], batch_size: int, shards: list[int] | None = None,
                  outlier_factor: float | None = None) -> int:
        """Batches per epoch that `batches` yields for these hooks and shards."""
        shard_ids = list(range(self.n_shards)) if shards is None else shards
        kept = sum(int(self.joint_keep_mask(index, hooks, outlier_factor).sum()) for index in shard_ids)
        return kept // batch_size

    def joint_keep_mask(self, index: int, hooks: list[str], outlier_factor: float | None = None) -> torch.Tensor:
        """Tokens kept in every one of `hooks`: [contexts*ctx] bool."""
        keep = self.keep_mask(index, hooks[0], outlier_factor)
        for h in hooks[1:]:
            keep &= self.keep_mask(index, h, outlier_factor)
        return keep

    def n_kept_tokens(self, hook: str) -> int:
        return self.stats(hook)["n_kept"]
