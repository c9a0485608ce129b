"""Layout 'dictionary_learning': ae.pt + config.json (dictionary_learning). (Being written.)"""
from pathlib import Path

from saes.base import SAE

NAME = "dictionary_learning"
DESCRIPTION = "ae.pt + config.json (dictionary_learning)"


def detect(path: Path) -> bool:
    return False


def load(path: Path, **options) -> SAE:
    raise NotImplementedError(NAME)
