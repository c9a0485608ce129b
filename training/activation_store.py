"""The on-disk activation cache: format, manifest, checksums and the shuffled minibatch reader.

A cache is a content-addressed folder `<root>/activations/<key>/`:
- `shard_00000.safetensors` ...: `tokens` [contexts, ctx] int32, `special` [contexts, ctx] uint8 (BOS/EOS/pad),
  and per hook `acts.<hook>` [contexts*ctx, d] (store dtype), `norms.<hook>` [contexts*ctx] float32 and
  optionally `grads.<hook>` [contexts*ctx, d] (gradient of the summed next-token loss w.r.t. the activation).
- `progress.json`: shards finished so far with their sha256 (what a resumed run continues from).
- `manifest.json`: written last, atomically; a folder without it is incomplete and never read as valid. It carries
  its own sha256 (`checksum`), so a hand-edited manifest is refused rather than trusted.
- `.lock`: held (fcntl.flock) by the process writing the cache, so two writers never interleave shards; the
  kernel drops it when that process dies, so a killed job leaves nothing stuck.
Training batches exclude special tokens and outlier-norm tokens (norm > outlier_factor x the median norm).
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOCK = ".lock"
FORMAT_VERSION = 1
FAILPOINT_ENV = "SAEWB_FAILPOINT"


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


def write_json_atomic(path: Path, data, advice: str | None = None) -> None:
    """Write JSON under a temporary name, flush it to disk and rename it over `path`: readers see the old file or
    the new one, never half of one. A failed write (disk full) removes the temporary file and names the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(json.dumps(data, indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(error, path, advice or f"the previous {path.name} (if any) is intact; free space in "
                                                 f"{path.parent} and run the same command again") from None


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def write_error(error: BaseException, path: Path, advice: str) -> OSError:
    """One sentence for a write that failed (disk full, file-size limit, I/O error) naming the file and its folder;
    `advice` says what was kept and how to go on."""
    code = error.errno if isinstance(error, OSError) else None
    text = getattr(error, "strerror", None) or (str(error).splitlines()[0] if str(error) else type(error).__name__)
    found = re.search(r"os error (\d+)", text)  # safetensors (Rust) reports "I/O error: ... (os error 28)"
    if code is None and found:
        code = int(found.group(1))
        text = os.strerror(code)
    reason = f"{text}: the disk is full or a file-size limit was hit" if code in DISK_FULL else text
    wrapped = OSError(f"Could not write {Path(path).name} in {Path(path).parent} ({reason}): {advice}.")
    wrapped.errno = code or errno.EIO
    return wrapped


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_free(folder: Path, needed: int, what: str, advice: str) -> None:
    """Pre-flight space check: an OSError naming the folder when `needed` bytes are not free there."""
    free = free_bytes(folder)
    if needed > free:
        raise OSError(f"{what} needs about {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB is free at {folder}: "
                      f"{advice}.")


def failpoint(name: str) -> None:
    """Fault injection for tests/faults: with $SAEWB_FAILPOINT=NAME or NAME:N the process SIGKILLs itself the N-th
    time (default 1) it passes failpoint NAME, so a test can kill a job exactly between two writes. Inert otherwise."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    wanted, _, count = spec.partition(":")
    if wanted != name:
        return
    _FAILPOINT_HITS[name] = _FAILPOINT_HITS.get(name, 0) + 1
    if _FAILPOINT_HITS[name] >= int(count or 1):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


_FAILPOINT_HITS: dict[str, int] = {}


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


def lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextmanager
def folder_lock(folder: Path, *, busy_message: str | None = None, waiting_message: str | None = None):
    """Hold `folder/.lock` (fcntl.flock, exclusive) for the block. The kernel releases it when the holder exits or
    is killed, so no stale lock survives a crash. When another process holds it: with `busy_message` raise
    FolderBusyError (the text may use {holder}); otherwise print `waiting_message` to stderr and wait."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(path)
            if busy_message is not None:
                raise FolderBusyError(busy_message.format(holder=holder)) from None
            if waiting_message:
                print(waiting_message.format(holder=holder), file=sys.stderr, flush=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:  # who holds it, for the other process's message; informational only (may fail on a full disk)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError:
            pass
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `checksum` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message says how to fix it."""


def read_manifest(path: Path) -> dict:
    """manifest.json, refused with one sentence when it is not valid JSON or no longer matches its checksum."""
    fix = f"delete the folder {path.parent} and run the same `saewb cache` command again"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CacheError(f"Cache manifest {path} is not valid JSON (truncated or edited): {fix}.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) or "key_fields" not in manifest:
        raise CacheError(f"Cache manifest {path} lacks its shard list or key fields (edited by hand?): {fix}.")
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
        raise CacheError(f"Cache manifest {path} was changed after it was written (its checksum no longer matches): "
                         f"{fix}.")
    return manifest


class ActivationCache:
    """Read side of a finished cache. Verifies shard checksums on first use of each shard."""

    def __init__(self, path: str | Path, *, model: str | None = None, hook: str | None = None, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.exists():
            raise CacheError(f"Cache folder {self.path} is missing (deleted or moved?): run the `saewb cache` command "
                             "that wrote it again, or point at the folder where it is now.")
        if not manifest_path.is_file():
            hint = " (it is incomplete: run the same `saewb cache` command again to finish it)" if (
                self.path / PROGRESS).is_file() else ""
            raise CacheError(f"{self.path} is not a finished activation cache{hint}.")
        self.manifest = read_manifest(manifest_path)
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
        fix = f"delete the folder {self.path} and run the same `saewb cache` command again"
        if not path.is_file():
            raise CacheError(f"Shard {path} is missing (manifest.json lists it): {fix}.")
        if file_sha256(path) != entry["sha256"]:
            raise CacheError(f"Shard {path} is corrupted (its sha256 differs from manifest.json's: truncated or "
                             f"altered): {fix}.")
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
