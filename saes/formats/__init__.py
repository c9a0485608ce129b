"""Load SAEs saved by other libraries, each layout written from its own format's definition.

A layout module defines NAME, DESCRIPTION (one line: the files it expects), `detect(path) -> bool` (cheap: file
names and config keys, never the tensors) and `load(path, **options) -> SAE` (an SAE of the family, or an
inference-only class such as GatedSAE, whose encode/decode equal the source library's, with what the source
states about itself in cfg.metadata["source"], see common.record_source).

    sae = saes.load_sae("path/to/folder")           # any known layout, found from its files
    sae = saes.load_sae("hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
"""
from pathlib import Path

from saes.base import SAE
from saes.formats import dictionary_learning, gemma_scope, llama_scope, openai, saelens, sparsify
from saes.formats.common import LayoutError

LAYOUTS = {module.NAME: module for module in (saelens, sparsify, gemma_scope, llama_scope, dictionary_learning, openai)}


def known_layouts() -> str:
    return "; ".join(f"{name} ({module.DESCRIPTION})" for name, module in LAYOUTS.items())


def detect_layout(path: Path) -> str:
    """The one layout whose files `path` holds; an error listing the known layouts when none or several match."""
    if not path.exists():
        raise LayoutError(f"{path} does not exist: pass a local SAE folder or file, or hf:ORG/REPO/PATH.")
    matches = [name for name, module in LAYOUTS.items() if module.detect(path)]
    if not matches:
        raise LayoutError(f"{path} holds no SAE layout this workbench knows. Known layouts: {known_layouts()}.")
    if len(matches) > 1:
        raise LayoutError(f"{path} could be any of the layouts {', '.join(matches)}: pass --layout to choose one.")
    return matches[0]


def load_layout(path: str | Path, layout: str | None = None, **options) -> SAE:
    """Load `path` (local, already downloaded) as `layout`, or as the layout its files show."""
    path = Path(path).expanduser()
    if layout is not None and layout not in LAYOUTS:
        raise LayoutError(f"Unknown layout {layout!r}. Known layouts: {known_layouts()}.")
    name = layout or detect_layout(path)
    return LAYOUTS[name].load(path, **options)


__all__ = ["LAYOUTS", "LayoutError", "detect_layout", "known_layouts", "load_layout"]
