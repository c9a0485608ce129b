"""Layout 'openai': a .pt state dict with pre_bias, encoder.weight, latent_bias, decoder.weight (OpenAI sparse_autoencoder). (Being written.)"""
from pathlib import Path

from saes.base import SAE

NAME = "openai"
DESCRIPTION = "a .pt state dict with pre_bias, encoder.weight, latent_bias, decoder.weight (OpenAI sparse_autoencoder)"


def detect(path: Path) -> bool:
    return False


def load(path: Path, **options) -> SAE:
    raise NotImplementedError(NAME)
