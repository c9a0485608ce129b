"""Corpus reading and the BOS convention (training/corpus.py)."""
import json
import struct
import zlib

import pytest
import torch

from training.corpus import bos_eos, iter_contexts, iter_texts, lines_to_text, read_r_strings, token_contexts


def r_record(strings: list[str]) -> bytes:
    """One record of an R lazy-load database holding a character vector, built by hand."""
    body = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    body += struct.pack(">ii", 16, len(strings))
    for s in strings:
        raw = s.encode()
        body += struct.pack(">ii", 0x00040009, len(raw)) + raw
    compressed = zlib.compress(body)
    return struct.pack(">I", len(body)) + compressed


def test_read_r_strings_round_trip():
    data = r_record(["EMMA", "", "By Jane Austen"]) + r_record(["Chapter 1", "It is a truth"])
    assert read_r_strings(data) == [["EMMA", "", "By Jane Austen"], ["Chapter 1", "It is a truth"]]


def test_lines_to_text_joins_wrapped_lines_into_paragraphs():
    assert lines_to_text(["It is a truth", "universally acknowledged.", "", "", "However"]) == \
        "It is a truth universally acknowledged.\n\nHowever"


def test_contexts_start_with_bos_and_documents_end_with_eos(tiny_model):
    tok = tiny_model.tokenizer
    bos, eos = bos_eos(tok)
    docs = ["Emma Woodhouse, handsome, clever, and rich.", "Mr. Darcy walked."]
    stream = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [eos]
    contexts = list(iter_contexts(tok, docs, context_length=5))
    assert len(contexts) == len(stream) // 4
    for i, row in enumerate(contexts):
        assert row[0].item() == bos
        assert row[1:].tolist() == stream[4 * i: 4 * i + 4]


def test_too_short_corpus_and_unknown_corpus_are_clear(tiny_model, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("A short document.")
    with pytest.raises(ValueError, match="fewer than the 100 requested"):
        token_contexts(tiny_model.tokenizer, str(text), 8, 100)
    with pytest.raises(ValueError, match="Unknown corpus"):
        token_contexts(tiny_model.tokenizer, "no-such-corpus", 8, 1)
    with pytest.raises(ValueError, match="at least 2"):
        next(iter_contexts(tiny_model.tokenizer, ["x"], 1))


def test_austen_corpus_is_six_novels(tiny_model):
    rows = token_contexts(tiny_model.tokenizer, "austen", 32, 10)
    assert rows.shape == (10, 32) and rows.dtype == torch.long
    assert "EMMA" in tiny_model.tokenizer.decode(rows[0])


def test_text_pieces_cut_at_paragraphs_and_lose_nothing():
    from training.corpus import text_pieces

    text = "\n\n".join(f"Paragraph {i} " + "word " * (i % 7) for i in range(500))
    pieces = list(text_pieces(text, size=300))
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(piece.endswith("\n\n") for piece in pieces[:-1])


def test_local_jsonl_and_parquet_corpora(tiny_model, tmp_path):
    import datasets

    rows = [{"body": "First document about Bath."}, {"body": "Second one, about Pemberley."}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "docs.parquet"))
    for name in ("docs.jsonl", "docs.parquet"):
        texts = list(iter_texts(str(tmp_path / name), "body"))
        assert texts == [r["body"] for r in rows]
    with pytest.raises(ValueError, match="no column 'text'"):
        token_contexts(tiny_model.tokenizer, str(tmp_path / "docs.jsonl"), 4, 1)


def test_unknown_model_is_one_clear_sentence(monkeypatch):
    from training.model import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_task_corpora_are_prompts_with_their_correct_answer(tiny_model):
    """`task:NAME` streams the circuit task's prompts completed by the right answer (task data for an SAE)."""
    import itertools
    import re

    from analysis.tasks import NAMES, SVA_NOUNS, TaskError

    ioi = list(itertools.islice(iter_texts("task:ioi"), 200))
    orders = []
    for text in ioi:
        m = re.fullmatch(r"When (\w+) and (\w+) went to the \w+, (\w+) gave a \w+ to (\w+)\.", text)
        assert m, text
        a, b, subject, answer = m.groups()
        assert subject in (a, b) and answer == (b if subject == a else a) and answer != subject
        orders.append("ABBA" if answer == a else "BABA")
        assert f" {answer}" in NAMES
    assert orders[:4] == ["ABBA", "BABA", "ABBA", "BABA"]
    assert ioi == list(itertools.islice(iter_texts("task:ioi"), 200))  # the same stream each time
    assert len(set(ioi)) > 150
    for text in itertools.islice(iter_texts("task:greater_than"), 100):
        start, end = re.fullmatch(r"The \w+ lasted from the year (\d\d)(\d\d) to the year \1(\d\d)\.", text).group(2, 3)
        assert int(end) > int(start)
    plurals = {p.strip() for _, p in SVA_NOUNS}
    for text in itertools.islice(iter_texts("task:sva"), 100):
        subject, verb = re.fullmatch(r"The (\w+) near the \w+ (is|are) here\.", text).groups()
        assert (verb == "are") == (subject in plurals)
    rows = token_contexts(tiny_model.tokenizer, "task:ioi", 32, 3)
    assert rows.shape == (3, 32) and "gave a" in tiny_model.tokenizer.decode(rows[0])
    with pytest.raises(TaskError, match="Unknown task 'nope'"):
        next(iter_texts("task:nope"))
