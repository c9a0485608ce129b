"""Text corpora and their tokenisation into fixed-length contexts.

Sources, by name:
- `austen` (default): Jane Austen's six novels from Debian's `r-cran-janeaustenr` package (public domain,
  about 4.0M characters, 1.0M SmolLM2 tokens), fetched once with `apt-get download` and cached as text.
- a local path: a `.txt` file (one document), a folder of `.txt` files, or a `.parquet`/`.jsonl` file read
  through `datasets` with a `text` column.
- `hf:NAME[:CONFIG][:SPLIT]`: any Hugging Face dataset, streamed through `datasets` (needs the hub).
- `task:ioi`, `task:greater_than`, `task:sva`: the circuit tasks' prompts with their answers, generated without end
  (analysis/tasks.py `task_texts`): "task data" for SAEs scored on a task (e.g. `saewb eval --supervised ioi`).

BOS convention: documents are tokenised without special tokens (long ones in paragraph-aligned pieces) and joined into one stream with the EOS token
after each document; the stream is cut into contexts of `context_length - 1` tokens and every context starts with
the tokenizer's BOS token. Position 0 (BOS) and every EOS/special token are masked out of training batches.
"""
import glob
import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from training.paths import cache_root

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def read_r_strings(rdb: bytes) -> list[list[str]]:
    """The character vectors of an R lazy-load database (Rdata.rdb).

    The file is a sequence of [4-byte big-endian length][zlib stream] records, each an R XDR serialisation.
    We only need plain character vectors (STRSXP, type 16) of CHARSXP elements (type 9), which is what
    janeaustenr stores: one vector per novel, one element per line.
    """
    vectors, offset = [], 0
    while offset < len(rdb):
        decompressor = zlib.decompressobj()
        raw = decompressor.decompress(rdb[offset + 4:])
        offset = len(rdb) - len(decompressor.unused_data)
        if raw[:2] != b"X\n":
            continue
        pos = 2 + 12  # format version, writer R version, minimal reader R version
        (enc_len,) = struct.unpack(">i", raw[pos:pos + 4])
        pos += 4 + enc_len  # native encoding name (version-3 serialisations)
        flags, length = struct.unpack(">ii", raw[pos:pos + 8])
        pos += 8
        if flags & 0xFF != 16:
            continue
        lines = []
        for _ in range(length):
            char_flags, n = struct.unpack(">ii", raw[pos:pos + 8])
            pos += 8
            if n == -1:  # NA_character_
                lines.append("")
                continue
            lines.append(raw[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        vectors.append(lines)
    return vectors


def lines_to_text(lines: list[str]) -> str:
    """Join a novel's lines: blank lines separate paragraphs, wrapped lines are joined with spaces."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def fetch_austen() -> Path:
    """Download the Debian package once and cache the six novels as JSON lines. Returns the cached file."""
    target = cache_root() / "corpus" / "austen.jsonl"
    if target.is_file():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            "The embedded corpus comes from Debian's r-cran-janeaustenr package, but apt-get/dpkg-deb are not "
            "available here: pass --corpus PATH (a .txt, .parquet or .jsonl file) or --corpus hf:DATASET."
        )
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(2):
            result = subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=tmp, capture_output=True, text=True)
            if result.returncode == 0:
                break
            if attempt == 0 and os.geteuid() == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        else:
            raise RuntimeError(
                f"`apt-get download {AUSTEN_PACKAGE}` failed ({result.stderr.strip()[:200]}): run `apt-get update` "
                "and try again, or pass --corpus PATH to use local text."
            )
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        books = read_r_strings((Path(tmp) / "x" / AUSTEN_RDB).read_bytes())
    texts = [lines_to_text(lines) for lines in books if sum(map(len, lines)) > 100_000]
    if len(texts) != 6:
        raise RuntimeError(f"Expected six novels in {AUSTEN_PACKAGE}, found {len(texts)}; the package layout changed.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = target.with_suffix(".tmp")
    tmp_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    os.replace(tmp_file, target)
    return target


def iter_texts(corpus: str, text_column: str = "text") -> Iterator[str]:
    """Documents of a corpus, in a fixed order (see the module docstring for the accepted names)."""
    if corpus == "austen":
        for line in fetch_austen().read_text().splitlines():
            yield json.loads(line)["text"]
        return
    if corpus.startswith("hf:"):
        yield from iter_hf(corpus[3:], text_column)
        return
    if corpus.startswith("task:"):
        from analysis.tasks import task_texts

        yield from task_texts(corpus[5:])
        return
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(glob.glob(str(path / "**" / "*.txt"), recursive=True))
        if not files:
            raise ValueError(f"Corpus folder {path} holds no .txt files: add some or point at a file.")
        for file in files:
            yield Path(file).read_text(errors="replace")
    elif path.is_file() and path.suffix == ".txt":
        yield path.read_text(errors="replace")
    elif path.is_file() and path.suffix in (".parquet", ".jsonl", ".json"):
        yield from iter_local_dataset(path, text_column)
    else:
        raise ValueError(
            f"Unknown corpus {corpus!r}: use 'austen' (the embedded default), a path to a .txt/.parquet/.jsonl "
            "file or a folder of .txt files, 'hf:DATASET[:CONFIG][:SPLIT]', or 'task:ioi' / 'task:greater_than' / "
            "'task:sva' (a circuit task's prompts)."
        )


def iter_local_dataset(path: Path, text_column: str) -> Iterator[str]:
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    data = datasets.load_dataset(kind, data_files=str(path), split="train")
    if text_column not in data.column_names:
        raise ValueError(f"{path} has no column {text_column!r} (columns: {data.column_names}); pass --text-column.")
    for row in data:
        yield row[text_column]


def iter_hf(spec: str, text_column: str) -> Iterator[str]:
    """hf:NAME[:CONFIG][:SPLIT], streamed so a large dataset never lands on disk whole."""
    import datasets

    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    data = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in data:
        if text_column not in row:
            raise ValueError(f"Dataset {name} has no column {text_column!r} (columns: {list(row)}); pass --text-column.")
        yield row[text_column]


def special_token_ids(tokenizer) -> list[int]:
    return sorted(set(tokenizer.all_special_ids))


def bos_eos(tokenizer) -> tuple[int, int]:
    """BOS and EOS ids; a tokenizer without a BOS uses its EOS as the context start (as GPT-2 does)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None or eos is None:
        raise ValueError("The tokenizer defines neither BOS nor EOS; contexts cannot be delimited.")
    return bos, eos


def text_pieces(text: str, size: int = 20_000) -> Iterator[str]:
    """A document in pieces of about `size` characters cut at paragraph breaks, so the first contexts of a
    long document are ready without tokenising all of it. The breaks stay with the preceding piece."""
    start = 0
    while start < len(text):
        end = text.find("\n\n", start + size)
        end = len(text) if end == -1 else end + 2
        yield text[start:end]
        start = end


def iter_contexts(tokenizer, texts: Iterable[str], context_length: int) -> Iterator[torch.Tensor]:
    """Contexts [context_length] of token ids: BOS + the next context_length-1 tokens of the document stream."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (BOS plus one token), got {context_length}.")
    bos, eos = bos_eos(tokenizer)
    body = context_length - 1
    buffer: list[int] = []
    for text in texts:
        for piece in text_pieces(text):
            buffer.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            while len(buffer) >= body:
                yield torch.tensor([bos] + buffer[:body], dtype=torch.long)
                del buffer[:body]
        buffer.append(eos)
        while len(buffer) >= body:
            yield torch.tensor([bos] + buffer[:body], dtype=torch.long)
            del buffer[:body]


def token_contexts(tokenizer, corpus: str, context_length: int, n_contexts: int, text_column: str = "text") -> torch.Tensor:
    """The first n_contexts contexts of a corpus: [n_contexts, context_length]; errors if the corpus is too short."""
    rows = []
    for row in iter_contexts(tokenizer, iter_texts(corpus, text_column), context_length):
        rows.append(row)
        if len(rows) == n_contexts:
            return torch.stack(rows)
    raise ValueError(
        f"Corpus {corpus!r} gives only {len(rows)} contexts of {context_length} tokens "
        f"({len(rows) * context_length} tokens), fewer than the {n_contexts} requested: ask for fewer tokens "
        "or use a larger corpus."
    )
