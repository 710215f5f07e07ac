"""Tests for model/data/corpus.py: the built-in corpus, file readers, load_corpus and the sentence splitter."""

import ast
import json
import sys
import sysconfig
from pathlib import Path

import pytest

from model.data import corpus
from model.data.corpus import builtin_corpus, load_corpus, read_jsonl, read_text, split_sentences

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return builtin_corpus()


def _docstring(path: Path, name: str) -> str:
    """A top-level function's docstring, read independently of corpus.py."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return ast.get_docstring(next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name))


def _first_paragraph(docstring: str) -> str:
    return " ".join(docstring.split("\n\n")[0].split())


def test_builtin_corpus_is_large_prose(documents):
    assert len(documents) > 1000
    assert sum(map(len, documents)) > 500_000
    assert all(len(doc) >= 80 for doc in documents)
    assert sum("Return" in doc for doc in documents) > 100
    assert len(set(documents)) == len(documents)


def test_builtin_corpus_drops_doctest_lines(documents):
    lines = [line for doc in documents for line in doc.splitlines()]
    assert not [line for line in lines if line.lstrip().startswith(">>>")]
    # statistics.mean's docstring is a sentence of prose followed by doctest examples.
    docstring = _docstring(STDLIB / "statistics.py", "mean")
    example = next(line for line in docstring.splitlines() if line.startswith(">>>"))[4:]
    prose = _first_paragraph(docstring)
    leaked = any(example in doc for doc in documents)
    kept = any(doc.startswith(prose) for doc in documents)
    assert example and not leaked and kept


def test_cleaning_drops_doctest_examples_with_their_output():
    docstring = (
        "Add two numbers.\n\nIt is fast:\n>>> add(1,\n...     2)\n3\n\nTitle\n=====\n\n  Indented   prose\n  goes on."
    )
    assert corpus._clean(docstring) == "Add two numbers.\n\nIt is fast:\n\nTitle\n\nIndented prose goes on."


def test_builtin_corpus_has_docstrings_and_pydoc_topics(documents):
    from pydoc_data.topics import topics

    opening = _first_paragraph(topics["if"].split("\n\n", 1)[1])  # after the title and underline
    assert opening.startswith('The "if" statement')
    found = any(opening in doc for doc in documents)  # a bare bool keeps a failure report short
    assert found
    copyfile = _docstring(STDLIB / "shutil.py", "copyfile")
    assert "\n\n".join(" ".join(part.split()) for part in copyfile.split("\n\n")) in documents


def test_builtin_corpus_skips_idlelib_and_imports_nothing(documents):
    idle_docs = [ast.get_docstring(ast.parse(p.read_bytes())) for p in sorted((STDLIB / "idlelib").glob("*.py"))]
    idle_only = [" ".join(d.split()) for d in idle_docs if d and len(d) > 200]
    if not idle_only:
        pytest.skip("this Python has no idlelib module docstrings to look for")
    leaked = any(text in doc for text in idle_only for doc in documents)
    assert not leaked
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_builtin_corpus_is_deterministic_and_truncates(documents):
    corpus._builtin_documents.cache_clear()
    assert builtin_corpus() == documents
    assert builtin_corpus(max_documents=3) == documents[:3]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_documents"):
            builtin_corpus(max_documents=bad)


def test_read_text_splits_on_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First line\nsame  document.\n\n  \n\nSecond one.\n\n\n", encoding="utf-8")
    assert read_text(path) == ["First line same document.", "Second one."]


def test_read_jsonl_reads_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"body": "three", "text": "x"}\n', encoding="utf-8")
    assert read_jsonl(path) == ["one", "two", "x"]
    path.write_text('{"body": "three"}\n', encoding="utf-8")
    assert read_jsonl(path, field="body") == ["three"]


@pytest.mark.parametrize("bad_line", ['{"body": "no text"}', "not json", '["text"]', '{"text": 3}'])
def test_read_jsonl_errors_name_file_line_and_field(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert f"{path}:2:" in message and "'text'" in message


def test_load_corpus_sources(tmp_path, documents):
    (tmp_path / "b.txt").write_text("Bee one.\n\nBee two.", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Ay."}) + "\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("Ignored.", encoding="utf-8")
    (tmp_path / "notes.text").write_text("Plain.\n\nText.", encoding="utf-8")
    assert load_corpus(tmp_path) == ["Ay.", "Bee one.", "Bee two."]
    assert load_corpus(tmp_path / "a.jsonl") == ["Ay."]
    assert load_corpus(str(tmp_path / "notes.text")) == ["Plain.", "Text."]
    assert load_corpus(["x", "y"]) == ["x", "y"]
    assert load_corpus(("x",)) == ["x"]
    assert load_corpus() == documents


def test_load_corpus_errors(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_corpus(missing)
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty_dir)
    with pytest.raises(ValueError, match="empty"):
        load_corpus([])
    with pytest.raises(TypeError, match="str"):
        load_corpus(["fine", 3])
    with pytest.raises(TypeError, match="source"):
        load_corpus(42)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One here. Two there! Three? Four.", ["One here.", "Two there!", "Three?", "Four."]),
        ("Use a tool, e.g. Make. Or not, i.e. Never.", ["Use a tool, e.g. Make.", "Or not, i.e. Never."]),
        ("Ask Mr. Smith and Dr. Who. Then go.", ["Ask Mr. Smith and Dr. Who.", "Then go."]),
        ("Apples, pears, etc. Are fruit.", ["Apples, pears, etc. Are fruit."]),
        ("Call f(). then stop. It ends.", ["Call f(). then stop.", "It ends."]),
        ("Version 3.11 is out. 42 is a number.", ["Version 3.11 is out.", "42 is a number."]),
        ('He said "stop." "Why?" she asked.', ['He said "stop."', '"Why?" she asked.']),
        ("J. R. R. Tolkien wrote. Yes.", ["J. R. R. Tolkien wrote.", "Yes."]),
        ("No end\n\nNew paragraph", ["No end", "New paragraph"]),
        ("Multi\nline. Sentence", ["Multi\nline.", "Sentence"]),
        ("   ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected
