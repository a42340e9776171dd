from __future__ import annotations

import itertools
import json
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.errors import DataError, DataWarning
from lmforge.data.sources import iter_documents, list_files


def test_text_file_is_one_document_bytes_exact(tmp_path):
    text = "line one\r\n\tline two 😀\r\n"
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    assert list(iter_documents(str(path))) == [("a.txt", text)]


def test_directory_recursive_sorted_skips_hidden_and_empty(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("z = 1\n")
    (tmp_path / "a.md").write_text("# a\n")
    (tmp_path / "c.txt").write_text("   \n\n")  # whitespace only: skipped
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / "b" / "__pycache__").mkdir()
    (tmp_path / "b" / "__pycache__" / "z.txt").write_text("cached\n")
    docs = list(iter_documents(str(tmp_path)))
    assert docs == [("a.md", "# a\n"), ("b/z.py", "z = 1\n")]  # origins relative to the corpus root


def test_glob(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt", "sub/x3.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    docs = list(iter_documents(str(tmp_path / "**" / "x*.txt")))
    assert docs == [("sub/x3.txt", "sub/x3.txt"), ("x1.txt", "x1.txt"), ("x2.txt", "x2.txt")]  # origin, text
    with pytest.raises(DataError, match=r"nomatch\*"):
        iter_documents(str(tmp_path / "nomatch*"))


def test_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "first doc\nwith newline", "id": 1}), "", json.dumps({"text": "zweite: ü"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(iter_documents(str(path)))
    assert docs == [("c.jsonl:1", "first doc\nwith newline"), ("c.jsonl:3", "zweite: ü")]
    # origins do not depend on how the path is spelled: the split stays the same
    relative = os.path.relpath(path)
    assert list(iter_documents(relative)) == docs


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [("{not json", "not valid JSON"), (json.dumps({"content": "x"}), "'text'"), ("[1, 2]", "'text'")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n" + bad_line + "\n")
    with pytest.raises(DataError, match=message) as err:
        list(iter_documents(str(path)))
    assert f"{path}:3" in str(err.value)
    assert "\n" not in str(err.value)


def test_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"id": [1, 2, 3, 4], "text": ["alpha", None, "γάμμα 😀", ""]})
    pq.write_table(table, path, row_group_size=2)
    docs = list(iter_documents(str(path)))
    assert docs == [("t.parquet:0", "alpha"), ("t.parquet:2", "γάμμα 😀")]


def test_parquet_without_text_column_names_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a"], "meta": [1]}), path)
    with pytest.raises(DataError, match="content, meta"):
        list(iter_documents(str(path)))


def test_binary_and_latin1_skipped_with_warning(tmp_path):
    (tmp_path / "good.txt").write_text("good text ✓\n", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    skipped = []
    with pytest.warns(DataWarning) as record:
        docs = list(iter_documents(str(tmp_path), skipped=skipped))
    assert docs == [("good.txt", "good text ✓\n")]
    messages = " ".join(str(w.message) for w in record)
    assert "blob.bin" in messages and "latin.txt" in messages
    assert sorted(Path(p).name for p in skipped) == ["blob.bin", "latin.txt"]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does-not-exist"):
        iter_documents(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable text documents"):
        list(iter_documents(str(tmp_path / "empty")))
    (tmp_path / "only_binary").mkdir()
    (tmp_path / "only_binary" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="only_binary"):
        list(iter_documents(str(tmp_path / "only_binary")))


def test_stdlib_files():
    files = list_files("stdlib")
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500
    assert all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    assert root / "json" / "decoder.py" in files
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)


def test_python_installation_files_are_stdlib_plus_site_packages():
    stdlib = list_files("stdlib")
    files = list_files("python")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert set(stdlib) <= set(files)  # the standard library, plus...
    import safetensors  # ...every installed package's .py files, lmforge's dependencies among them

    assert Path(safetensors.__file__).resolve() in files
    assert all(p.suffix == ".py" and "__pycache__" not in p.parts for p in files)
    assert len(files) > len(stdlib) and any(p.resolve().is_relative_to(site) for p in files)


def test_python_installation_origins_do_not_depend_on_where_it_lives():
    documents = iter_documents("python", warn=False)
    origins = [origin for origin, _ in itertools.islice(documents, 2000)]
    assert origins == sorted(origins)
    assert {origin.split("/", 1)[0] for origin in origins} <= {"stdlib", "site-packages"}
    assert "site-packages/safetensors/__init__.py" in {o for o, _ in iter_documents("python", warn=False)}
