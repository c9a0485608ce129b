"""Layout 'gemma_scope': params.npz (Gemma Scope 1) or params.safetensors (Gemma Scope 2). (Being written.)"""
from pathlib import Path

from saes.base import SAE

NAME = "gemma_scope"
DESCRIPTION = "params.npz (Gemma Scope 1) or params.safetensors (Gemma Scope 2)"


def detect(path: Path) -> bool:
    return False


def load(path: Path, **options) -> SAE:
    raise NotImplementedError(NAME)
