"""Text sources for pretraining: the built-in standard-library corpus, text and JSONL files, a sentence splitter."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path

# Folders of the standard library whose docstrings are not prose about Python: test suites,
# the IDLE application, the deprecated 2to3 fixers and turtle demos.
_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"})
_MIN_DOCUMENT_CHARS = 80
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# reST heading underlines ("*****", "=====") carry no words, only tokens.
_UNDERLINE = re.compile(r"^[*=\-~^#+]{3,}$")
_DEFINITION_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# Words ending in a period that rarely end a sentence; compared in lower case.
_ABBREVIATIONS = frozenset(
    {
        "e.g.",
        "i.e.",
        "etc.",
        "cf.",
        "vs.",
        "viz.",
        "al.",
        "approx.",
        "mr.",
        "mrs.",
        "ms.",
        "dr.",
        "prof.",
        "sr.",
        "jr.",
        "st.",
        "no.",
        "fig.",
        "vol.",
        "resp.",
    }
)
# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace,
# then something that can start a sentence.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def _clean(text: str) -> str:
    """Turn a docstring or pydoc topic into paragraphs of prose separated by blank lines."""
    paragraphs = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        kept = []
        for line in paragraph.splitlines():
            stripped = line.strip()
            # A doctest example runs to the end of its paragraph: the prompt lines and the
            # expected output after them are code, not prose.
            if stripped.startswith((">>>", "...")):
                break
            if not _UNDERLINE.match(stripped):
                kept.append(stripped)
        words = " ".join(" ".join(kept).split())
        if words:
            paragraphs.append(words)
    return "\n\n".join(paragraphs)


def _stdlib_files() -> list[Path]:
    """The standard library's Python files outside the skipped folders, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (path for path in root.rglob("*.py") if path.is_file())
    return sorted(path for path in files if not _SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1]))


def _docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of one source file, in source order.

    Parsing instead of importing: importing some standard-library modules has side effects
    (``antigravity`` opens a browser, ``this`` prints). A file that cannot be read, decoded or
    parsed yields no docstrings.
    """
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, _DEFINITION_NODES)]
    nodes.sort(key=lambda node: (node.lineno, node.col_offset))
    found = (ast.get_docstring(node, clean=True) for node in [tree, *nodes])
    return [doc for doc in found if doc]


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[str, ...]:
    """All built-in documents, computed once per process because parsing takes seconds."""
    from pydoc_data.topics import topics

    raw = [doc for path in _stdlib_files() for doc in _docstrings(path)]
    raw += [topics[name] for name in sorted(topics)]
    cleaned = (_clean(doc) for doc in raw)
    # dict.fromkeys drops repeated docstrings (inherited stubs, copies) keeping first-seen order.
    return tuple(doc for doc in dict.fromkeys(cleaned) if len(doc) >= _MIN_DOCUMENT_CHARS)


def builtin_corpus(max_documents: int | None = None) -> list[str]:
    """Return the built-in corpus: the standard library's docstrings and the pydoc topics.

    Every Python install has this English prose, so no download is needed. A document is one
    docstring or one topic with doctest examples removed and whitespace normalized;
    paragraphs are separated by a blank line. Its content depends on the Python version.

    Args:
        max_documents: keep only the first this many documents; None keeps all.

    Returns:
        The documents, in a deterministic order (sorted files, then sorted topic names).
    """
    if max_documents is not None and (
        not isinstance(max_documents, int) or isinstance(max_documents, bool) or max_documents < 1
    ):
        raise ValueError(f"max_documents={max_documents!r}: expected None or an int >= 1")
    return list(_builtin_documents()[:max_documents])


def read_text(path: str | os.PathLike) -> list[str]:
    """Read a UTF-8 plain-text file whose documents are separated by blank lines.

    Args:
        path: the file.

    Returns:
        The non-empty documents, each with its whitespace collapsed to single spaces.
    """
    text = Path(path).read_text(encoding="utf-8")
    documents = (" ".join(part.split()) for part in _PARAGRAPH_BREAK.split(text))
    return [doc for doc in documents if doc]


def read_jsonl(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Read a JSONL file holding one JSON object per line; blank lines are skipped.

    Args:
        path: the file.
        field: the key whose string value is a document.

    Returns:
        The documents in file order.

    Raises:
        ValueError: a line is not a JSON object with a string under ``field``; the message
            names the file, the line number and the field.
    """
    documents = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({error.msg}); expected an object with a string under {field!r}"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with a string under {field!r}, got {line.strip()[:80]!r}"
                )
            documents.append(record[field])
    return documents


def _read_file(path: Path) -> list[str]:
    return read_jsonl(path) if path.suffix == ".jsonl" else read_text(path)


def load_corpus(source: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """Load documents from wherever the user points.

    Args:
        source: None for the built-in corpus; a ``.jsonl`` file (documents under "text");
            any other file (plain text, blank-line separated); a directory (its ``*.txt``
            and ``*.jsonl`` files, sorted by name, not recursive); or a list/tuple of
            strings, used as they are.

    Returns:
        The documents.

    Raises:
        FileNotFoundError: the path does not exist.
        TypeError: source is of another type, or a list holds something other than str.
        ValueError: the corpus has no non-blank document.
    """
    if source is None:
        documents = builtin_corpus()
    elif isinstance(source, (list, tuple)):
        bad = next((item for item in source if not isinstance(item, str)), None)
        if bad is not None:
            raise TypeError(f"source: every document must be a str, got {type(bad).__name__}")
        documents = list(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"corpus source {str(path)!r} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
            documents = [doc for file in files for doc in _read_file(file)]
        else:
            documents = _read_file(path)
    else:
        raise TypeError(f"source: expected None, a path or a list of str, got {type(source).__name__}")
    if not any(doc.strip() for doc in documents):
        raise ValueError(f"the corpus from {source!r} is empty: it has no non-blank document")
    return documents


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a simple rule-based splitter.

    A sentence ends at ``.``, ``!`` or ``?`` (plus any closing quotes or brackets) followed by
    whitespace and an uppercase letter, digit or opening quote; a period that ends a common
    abbreviation ("e.g.", "Mr.") or a single initial ("J.") does not end a sentence. A blank
    line always ends one.

    Args:
        text: the text.

    Returns:
        The non-empty sentences, stripped, in order.
    """
    sentences = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            last_word = paragraph[start : match.start() + 1].rsplit(None, 1)[-1].lower()
            if last_word in _ABBREVIATIONS or re.fullmatch(r"[a-z]\.", last_word):
                continue
            sentences.append(paragraph[start : match.end()].strip())
            start = match.end()
        sentences.append(paragraph[start:].strip())
    return [sentence for sentence in sentences if sentence]
