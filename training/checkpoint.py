"""Checkpoints of a training job: written atomically every N tokens and at the end, read back for exact resume.

Layout: `<run>/checkpoints/step_00000123/` holding `trainer_state.pt` (every SAE's parameters and buffers,
optimiser, counters, step, tokens, RNG) and, per SAE, a folded SAELens-layout folder that other tools can load.
A checkpoint folder is built under a temporary name and renamed, so the newest complete one is always valid.
"""
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from saes import save_sae

STATE = "trainer_state.pt"
PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, trainer, keep: int = 2) -> Path:
    """Write a checkpoint for the trainer's current step; keep the newest `keep` ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{trainer.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".step.tmp-", dir=root))
    try:
        torch.save(trainer.state_dict(), tmp / STATE)
        for name, state in trainer.states.items():
            save_sae(state.sae, tmp / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)
