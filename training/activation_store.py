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
        self, hook: str, batch_size: int, *, seed: int = 0, buffer_tokens: int = 262_144, shards: list[int] | None = None,
        grads: bool = False, epochs: int = 1, outlier_factor: float | None = None,
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled minibatches [batch_size, d] through a bounded shuffle buffer; deterministic for a seed.

        Shards are visited in a seeded random order and appended to a buffer of at most about
        `buffer_tokens` + one shard; whenever it is full it is shuffled and its first half is emitted.
        Memory stays bounded whatever the cache size. The last incomplete batch is dropped.
        """
        self.check_hook(hook)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        generator = torch.Generator().manual_seed(seed)
        shard_ids = list(range(self.n_shards)) if shards is None else list(shards)
        for _ in range(epochs):
            buffer: list[torch.Tensor] = []  # [n, d] or [n, 2d] when gradients ride along
            size = 0
            for position in torch.randperm(len(shard_ids), generator=generator).tolist():
                data = self.shard_tokens(shard_ids[position], hook, grads=grads, outlier_factor=outlier_factor)
                data = torch.cat(data, dim=1) if grads else data
                buffer.append(data)
                size += len(data)
                if size >= buffer_tokens:
                    pool = torch.cat(buffer)[torch.randperm(size, generator=generator)]
                    emit = (size // 2) // batch_size * batch_size
                    yield from self._split(pool[:emit], batch_size, grads, self.d_in(hook))
                    buffer, size = [pool[emit:]], size - emit
            if size:
                pool = torch.cat(buffer)[torch.randperm(size, generator=generator)]
                yield from self._split(pool[: size // batch_size * batch_size], batch_size, grads, self.d_in(hook))

    @staticmethod
    def _split(pool: torch.Tensor, batch_size: int, grads: bool, d: int):
        for start in range(0, len(pool), batch_size):
            chunk = pool[start:start + batch_size]
            yield (chunk[:, :d], chunk[:, d:]) if grads else chunk

    def n_kept_tokens(self, hook: str) -> int:
        return self.stats(hook)["n_kept"]
