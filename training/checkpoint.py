"""Checkpoints of a training job: written atomically every N tokens and at the end, read back for exact resume.

Layout: `<run>/checkpoints/step_00000123/` holding `trainer_state.pt` (every SAE's parameters and buffers,
optimiser, counters, step, tokens, RNG), per SAE a folded SAELens-layout folder that other tools can load, and
`checksums.json` (sha256 of every file, written last). A checkpoint folder is built under a temporary name and
renamed, so a crash never leaves a half-written one under a real name; one damaged afterwards (truncated, a flipped
byte) fails its checksums, and resume falls back to the newest checkpoint that passes (`resume_checkpoint`).
`trainer_state.pt` is read with `torch.load(weights_only=True)`: tensors and plain containers only, no pickled code.
"""
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from saes import save_sae
from training.activation_store import failpoint, file_sha256, require_free, write_error

STATE = "trainer_state.pt"
CHECKSUMS = "checksums.json"
PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back; the message names it."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tensor_bytes(value) -> int:
    """Bytes of every tensor inside nested dicts/lists."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def estimate_bytes(trainer) -> int:
    """Size of one checkpoint of `trainer`: per SAE its parameters and buffers, Adam's two moments, and the folded
    SAELens copy; plus 10% and 1 MB for headers, counters and RNG."""
    total = 0
    for state in trainer.states.values():
        params = sum(p.numel() * p.element_size() for p in state.sae.parameters())
        buffers = sum(b.numel() * b.element_size() for b in state.sae.buffers())
        total += 4 * params + 2 * buffers + tensor_bytes(state.counter.tokens_since_fired)
    return int(1.1 * total) + 2**20


class _Writer(io.RawIOBase):
    """A file torch.save writes through, keeping the OSError of a failed write (torch reports it as an opaque
    RuntimeError), so a full disk is named as such."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_state(state: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        writer = _Writer(handle)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def save_checkpoint(run_dir: Path, trainer, keep: int = 2) -> Path:
    """Write a checkpoint for the trainer's current step; keep the newest `keep` ones.

    Checks the free space first; a write that fails (disk full) removes its temporary folder and names it, and the
    previous checkpoints stay as they were."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{trainer.step:08d}"
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was written yet"
    advice = (f"{kept}; free space in {root} (or lower --keep-checkpoints) and run the same command again to resume")
    require_free(root, estimate_bytes(trainer), f"Checkpoint {target.name}", advice)
    tmp = Path(tempfile.mkdtemp(prefix=".step.tmp-", dir=root))
    try:
        try:
            save_state(trainer.state_dict(), tmp / STATE)
            for name, state in trainer.states.items():
                save_sae(state.sae, tmp / name)
            failpoint("checkpoint.written")  # tests: a complete temporary folder not yet renamed
            sums = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
        except (OSError, RuntimeError, ValueError) as error:
            raise write_error(error, target, advice) from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failpoint("checkpoint.renamed")  # tests: the new checkpoint is in place, the old ones not rotated yet
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_partial(run_dir: Path, folders=()) -> None:
    """Temporary folders a killed job left: unfinished checkpoints, and unfinished SAE saves in `folders`. Call it
    only while holding the run folder's lock."""
    root = checkpoint_dir(run_dir)
    stale = list(root.glob(".step.tmp-*")) if root.is_dir() else []
    for folder in folders:
        stale += list(Path(folder).glob(".sae.tmp-*")) if Path(folder).is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders (named step_*, holding a trainer state), oldest first. Their content is checked on load."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> None:
    """Every file listed in checksums.json exists with its sha256 (checkpoints written before checksums existed
    are accepted as they are)."""
    path = Path(path)
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        return
    try:
        sums = json.loads(sums_path.read_text())
    except ValueError:
        raise CheckpointError(f"Checkpoint {path}: {CHECKSUMS} is not valid JSON") from None
    for name, digest in sums.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path}: {name} is missing")
        if file_sha256(file) != digest:
            raise CheckpointError(f"Checkpoint {path}: {name} is truncated or corrupted (sha256 differs from "
                                  f"{CHECKSUMS})")


def load_checkpoint(path: Path) -> dict:
    """The trainer state of a checkpoint, after checking its checksums; CheckpointError when it cannot be used."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a bad pickle opcode, a disallowed global...
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"Checkpoint {path}: {STATE} cannot be read ({first})") from None


def resume_checkpoint(run_dir: Path, log=None) -> tuple[Path | None, dict | None]:
    """(folder, trainer state) of the newest checkpoint that reads back intact, newest first; each one skipped is
    reported through `log` (default: stderr) with the reason. (None, None) when there is none."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    found = list_checkpoints(run_dir)
    for position in range(len(found) - 1, -1, -1):
        path = found[position]
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            older = found[position - 1] if position > 0 else None
            then = f"resuming from the previous one, {older}" if older else "no older checkpoint: training starts over"
            log(f"saewb: {error}: {then} (delete {path} once you no longer need it).")
            continue
        return path, state
    return None, None
