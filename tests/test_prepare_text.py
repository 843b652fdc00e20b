"""`python -m llmc_lessons.data prepare --input`: the user's own text into llm.c token files."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llmc_lessons import data
from llmc_lessons.tokenizer import EOT, encode, gpt2


def ordinary(text):
    return gpt2().encode_ordinary(text)


def both(summary):
    return data.read_tokens(summary["train"]).tolist(), data.read_tokens(summary["val"]).tolist()


PIECES = st.sampled_from(["the", " cat", "Hello", ",", ".", "'s", "42", "é", "日本", "  ", " ", "\n", "\n\n", "\t",
                          "\r\n", "<|endoftext|>", "!!", "x" * 40])


@settings(max_examples=40, deadline=None)
@given(st.lists(PIECES, min_size=100, max_size=300), st.integers(8, 64), st.sampled_from([0.1, 0.5, 0.9]))
def test_streaming_gives_the_tokens_of_the_whole_text(tmp_path_factory, parts, read_bytes, val_fraction):
    # read in tiny blocks, cut for the split: the tokens are those of the whole text, with EOT at each file start
    text = "A first word " + "".join(parts) + " and this is the end"
    folder = tmp_path_factory.mktemp("t")
    (folder / "doc.txt").write_text(text, encoding="utf-8")
    s = data.prepare_text(folder / "doc.txt", folder / "out", val_fraction=val_fraction, progress=False,
                          read_bytes=read_bytes)
    train, val = both(s)
    assert train[0] == EOT and val[0] == EOT
    assert train + val[1:] == [EOT] + ordinary(text)
    assert (s["train_documents"], s["val_documents"]) == (1, 1)


def test_split_is_near_the_requested_fraction(tmp_path):
    text = "".join(f"Line {i} of a longer text, with some words in it.\n" for i in range(2000))
    (tmp_path / "big.txt").write_text(text)
    s = data.prepare_text(tmp_path / "big.txt", tmp_path, val_fraction=0.2, progress=False, read_bytes=1000)
    train, val = both(s)
    assert 0.18 < len(val) / (len(train) + len(val)) < 0.22
    assert train + val[1:] == [EOT] + ordinary(text)
    assert s["train_tokens"] == len(train) and s["val_tokens"] == len(val)
    assert not list(tmp_path.glob(".*.tmp"))


def test_folder_of_txt_files(tmp_path):
    docs = {"b.txt": "Second document.\n", "a.txt": "First document.\n", "sub/c.txt": "Third, in a subfolder.\n",
            "d.txt": "Fourth one, which is last.\n"}
    for name, text in docs.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    (tmp_path / "in" / "notes.md").write_text("not a .txt file: left out")
    s = data.prepare_text(tmp_path / "in", tmp_path / "out", val_fraction=0.2, progress=False)
    assert s["train"].endswith("in_train.bin") and s["files"] == 4
    train, val = both(s)
    order = ["a.txt", "b.txt", "d.txt", "sub/c.txt"]
    whole = [t for name in order for t in [EOT] + ordinary(docs[name])]
    assert train + val[1:] == whole
    assert s["train_documents"] + s["val_documents"] == 5   # four documents, one cut in two by the split


def test_jsonl_with_a_field(tmp_path):
    records = [{"id": i, "story": f"Story number {i}. Once upon a time there was a cat."} for i in range(20)]
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")   # a blank line at the end is fine
    s = data.prepare_text(path, tmp_path, field="story", progress=False)
    train, val = both(s)
    assert s["train_documents"] + s["val_documents"] in (20, 21)
    joined = train + val
    assert joined.count(EOT) == s["train_documents"] + s["val_documents"]
    assert [t for t in joined if t != EOT] == [t for r in records for t in ordinary(r["story"])]


@pytest.mark.parametrize("name, content, message", [
    ("bin.txt", b"abc\n\x00\x01\x02", r"bin.txt: line 2: a NUL byte at byte 4: this looks like a binary"),
    ("latin.txt", "caf\u00e9 au lait\nna\u00efve\n".encode("latin-1"),
     r"latin.txt: line 1: bytes e9 at byte 3 are not valid UTF-8"),
    ("later.txt", b"ok line\nsecond ok\nbad \xff here\n", r"later.txt: line 3: bytes ff at byte 22"),
    ("empty.txt", b"", r"empty.txt: the file holds no text"),
    ("blank.txt", b"  \n\n \t\n", r"blank.txt: the file holds no text"),
    ("a.jsonl", b'{"text": "fine"}\n{"body": "no text field"}\n',
     r"a.jsonl: line 2: no field 'text'; this record has \['body'\]"),
    ("b.jsonl", b'{"text": "fine"}\n{"text": "broken\n', r"b.jsonl: line 2: not valid JSON"),
    ("c.jsonl", b'{"text": ""}\n', r"c.jsonl: line 1: field 'text' is empty"),
    ("d.jsonl", b'{"text": 3}\n', r"d.jsonl: line 1: field 'text' holds int, not a string"),
    ("e.jsonl", b'["text"]\n', r"e.jsonl: line 1: expected a JSON object, got list"),
    ("f.jsonl", b'{"text": "caf\xe9"}\n', r"f.jsonl: line 1: bytes e9 are not valid UTF-8"),
    ("tiny.txt", b"Hi", r"tiny.txt: too little text"),
])
def test_bad_input_names_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.prepare_text(tmp_path / name, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())   # nothing half-written


def test_bad_paths_and_arguments(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: the folder holds no .txt files"):
        data.prepare_text(tmp_path / "empty", tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere.txt: no such file or folder"):
        data.prepare_text(tmp_path / "nowhere.txt", tmp_path, progress=False)
    (tmp_path / "t.txt").write_text("Some words for the test.\n" * 20)
    with pytest.raises(ValueError, match="val_fraction"):
        data.prepare_text(tmp_path / "t.txt", tmp_path, val_fraction=1.0, progress=False)


def test_existing_files_are_kept_unless_overwrite(tmp_path):
    (tmp_path / "t.txt").write_text("Some words for the test.\n" * 20)
    first = data.prepare_text(tmp_path / "t.txt", tmp_path, progress=False)
    before = open(first["train"], "rb").read()
    (tmp_path / "t.txt").write_text("Other words now.\n" * 20)
    with pytest.raises(FileExistsError, match="--overwrite"):
        data.prepare_text(tmp_path / "t.txt", tmp_path, progress=False)
    assert open(first["train"], "rb").read() == before
    data.prepare_text(tmp_path / "t.txt", tmp_path, overwrite=True, progress=False)
    assert open(first["train"], "rb").read() != before


def test_token_file_writer_writes_header_last_and_atomically(tmp_path):
    w = data.TokenFileWriter(tmp_path / "x.bin")
    w.write([1, 2, 3])
    w.write(np.array([65535], dtype=np.int64))
    assert not (tmp_path / "x.bin").exists()       # nothing under the name until close()
    with pytest.raises(ValueError, match="uint16"):
        w.write([70000])
    assert w.close() == tmp_path / "x.bin"
    assert data.read_tokens(tmp_path / "x.bin").tolist() == [1, 2, 3, 65535]
    w = data.TokenFileWriter(tmp_path / "x.bin")
    w.write([9])
    w.discard()
    assert data.read_tokens(tmp_path / "x.bin").tolist() == [1, 2, 3, 65535]
    assert not list(tmp_path.glob(".*.tmp"))


def test_command_line(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("A short story about a cat who sat.\n" * 30)
    assert data.main(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "1 documents" in out and "--train-bin" in out and str(tmp_path / "o" / "t_train.bin") in out
    assert data.main(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "s.jsonl").write_text('{"txt": "x"}\n')
    assert data.main(["prepare", "--input", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "s.jsonl: line 1: no field 'text'" in capsys.readouterr().err
