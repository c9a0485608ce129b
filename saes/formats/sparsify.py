"""Layout 'sparsify': <run>/<hookpoint>/cfg.json + sae.safetensors (EleutherAI sparsify). (Being written.)"""
from pathlib import Path

from saes.base import SAE

NAME = "sparsify"
DESCRIPTION = "<run>/<hookpoint>/cfg.json + sae.safetensors (EleutherAI sparsify)"


def detect(path: Path) -> bool:
    return False


def load(path: Path, **options) -> SAE:
    raise NotImplementedError(NAME)
