"""`hf:ORG/REPO/PATH` sources: download the files under PATH from the Hugging Face hub (huggingface_hub, with its
cache and resume) and return the local folder or file, so every layout loader reads local files only."""
from pathlib import Path

PREFIX = "hf:"


def is_hub(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> tuple[str, str]:
    """'hf:ORG/REPO/PATH' -> ('ORG/REPO', 'PATH'); PATH may be empty (the repo root)."""
    parts = source[len(PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{source!r} is not a hub source: write hf:ORG/REPO/PATH, e.g. "
                         "hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71.")
    return "/".join(parts[:2]), "/".join(parts[2:])


def download(source: str) -> Path:
    """The local copy of a hub source (a folder, or a single file such as an OpenAI .pt), downloaded if needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, sub = parse(source)
    patterns = [sub, f"{sub}/*", f"{sub}/**"] if sub else None
    try:
        root = Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise ValueError(f"Could not download {source} ({str(error).splitlines()[0][:160]}): check the repo and "
                         "path on huggingface.co and that the hub is reachable (or download it and pass the "
                         "local folder).") from None
    local = root / sub if sub else root
    if not local.exists():
        raise ValueError(f"{repo} has no file or folder {sub!r}: check the path on huggingface.co/{repo}.")
    return local
