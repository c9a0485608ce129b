"""Where the workbench keeps what it downloads, converts or caches (architecture.md "Artifacts on disk")."""
import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/saewb, or $SAEWB_CACHE when set."""
    return Path(os.environ.get("SAEWB_CACHE", Path.home() / ".cache" / "saewb")).expanduser()
