"""docs/methods.md is the methods document the code cites: every section cited with a section sign in the code,
tests, README and notebooks must exist in it, so that a reader who clones the repository can follow each citation.

A section exists when docs/methods.md has a heading that starts with its id ("### 6.7 Tests", "## 5. ...",
"### A. ...") or a bullet labelled with it in bold ("- **<sign>6.7.5** ..."). Citations are the section sign followed
by an id ("1.1", "6.7.5", "D.7", "C.12", a bare "5"); a trailing full stop is punctuation, and "10.1-10.2" cites both.
The section sign is spelled as an escape here so that this file cites nothing itself.
"""
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
SIGN = "\N{SECTION SIGN}"
CODE_FOLDERS = ("saes", "training", "analysis", "app", "bench", "tests")

ID = r"(?:\d+(?:\.\d+)*|[A-Z](?:\.\d+)*)(?![A-Za-z0-9_])"
CITATION = re.compile(SIGN + r"\s?(" + ID + r")(?:\s?[-\u2013]\s?(\d+(?:\.\d+)+)(?![A-Za-z0-9_]))?")
HEADING = re.compile(r"^#{1,6}\s+(?:" + SIGN + r"\s?)?(" + ID + r")\.?(?:\s|$)")
LABEL = re.compile(r"^\s*[-*+]\s+\*\*" + SIGN + r"(" + ID + r")\.?\*\*")
FENCE = re.compile(r"^\s*(```|~~~)")


def strings_of(value) -> list[str]:
    """Every string inside a decoded JSON value (notebook sources and outputs)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in strings_of(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings_of(item)]
    return []


def cited_files() -> list[Path]:
    files = [p for folder in CODE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))
             if "__pycache__" not in p.parts]
    return files + [ROOT / "README.md"] + sorted((ROOT / "notebooks").glob("*.ipynb"))


def file_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":  # sources are JSON strings: decode them (escapes, joined lines)
        return "\n".join(strings_of(json.loads(text)))
    return text


def citations(text: str) -> tuple[list[tuple[str, int]], list[tuple[int, str]]]:
    """(id, line) of every citation in `text`, and (line, excerpt) of section signs not followed by an id."""
    found, unparsable = [], []
    for number, line in enumerate(text.splitlines(), 1):
        for position in [m.start() for m in re.finditer(SIGN, line)]:
            match = CITATION.match(line, position)
            if match is None:
                unparsable.append((number, line[position:position + 30]))
                continue
            found += [(ident, number) for ident in match.groups() if ident]
    return found, unparsable


def defined_sections(text: str) -> set[str]:
    """Section ids that docs/methods.md defines by a heading or a bold label (fenced code blocks ignored)."""
    ids, in_code = set(), False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        match = HEADING.match(line) or LABEL.match(line)
        if match:
            ids.add(match.group(1))
    return ids


@pytest.fixture(scope="module")
def sections() -> set[str]:
    assert METHODS.is_file(), "docs/methods.md is missing: the code cites its sections."
    return defined_sections(METHODS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cited() -> dict[str, list[str]]:
    """Cited id -> ["path:line", ...] over the code, tests, README and notebooks."""
    where = defaultdict(list)
    for path in cited_files():
        for ident, line in citations(file_text(path))[0]:
            where[ident].append(f"{path.relative_to(ROOT)}:{line}")
    return where


def test_the_parsers_read_headings_labels_and_citations():
    doc = "## 5. Part\n### 6.7 Tests\n- **" + SIGN + "6.7.5** item\n```\n# 9.9 not a heading\n```\n### A. Appendix\n"
    assert defined_sections(doc) == {"5", "6.7", "6.7.5", "A"}
    text = f"see {SIGN}5.2. and {SIGN}D.7, {SIGN}10.1-10.2, {SIGN}1.3-{SIGN}1.6, {SIGN}8 and {SIGN}x"
    found, unparsable = citations(text)
    assert [ident for ident, _ in found] == ["5.2", "D.7", "10.1", "10.2", "1.3", "1.6", "8"]
    assert unparsable == [(1, SIGN + "x")]


def test_methods_doc_keeps_the_numbering(sections):
    expected = {"0.1", "0.4", "1.1", "1.7", "2.7.9", "3.1", "3.3", "4.6.5", "5.7.5", "6.7.5", "7.7.7", "8.6", "9.4",
                "10.5", "A", "B", "C.12", "D.14"}
    assert expected <= sections, f"docs/methods.md lost sections {sorted(expected - sections)}"


def test_every_section_sign_is_followed_by_a_section_id():
    bad = [f"{path.relative_to(ROOT)}:{line}: {excerpt!r}" for path in cited_files()
           for line, excerpt in citations(file_text(path))[1]]
    assert not bad, "Section signs that cite no section id (write e.g. 'docs/methods.md <sign>3.1'):\n" + "\n".join(bad)


def test_every_cited_section_exists_in_the_methods_doc(sections, cited):
    assert cited, "No citations found: the scan is broken."
    missing = {ident: places for ident, places in cited.items() if ident not in sections}
    report = "\n".join(f"  {ident}: cited at {', '.join(places[:5])}" + (" ..." if len(places) > 5 else "")
                       for ident, places in sorted(missing.items()))
    assert not missing, f"Sections cited in the code but absent from docs/methods.md:\n{report}"


def test_cross_references_inside_the_methods_doc_resolve(sections):
    found, unparsable = citations(METHODS.read_text(encoding="utf-8"))
    dangling = sorted({f"{ident} (line {line})" for ident, line in found if ident not in sections})
    assert not unparsable and not dangling, f"docs/methods.md refers to missing sections: {dangling} {unparsable}"


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files; without git, every file outside .git and virtualenvs."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
        return [ROOT / name for name in listed if name and (ROOT / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "venv", "__pycache__"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_no_file_outside_docs_cites_the_private_spec():
    old_name = "algorithms" + ".md"  # built, so that a repo-wide rename of the citations leaves this test intact
    offenders = []
    for path in repository_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "docs":
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        if old_name in text:
            offenders.append(str(relative))
    assert not offenders, (f"These files still cite {old_name}, which is not in the repository; cite "
                           f"docs/methods.md instead: {', '.join(sorted(offenders))}")
