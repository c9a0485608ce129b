"""Layout 'llama_scope': hyperparams.json + checkpoints/final.safetensors (Llama Scope). (Being written.)"""
from pathlib import Path

from saes.base import SAE

NAME = "llama_scope"
DESCRIPTION = "hyperparams.json + checkpoints/final.safetensors (Llama Scope)"


def detect(path: Path) -> bool:
    return False


def load(path: Path, **options) -> SAE:
    raise NotImplementedError(NAME)
