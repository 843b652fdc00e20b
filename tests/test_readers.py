"""The file readers on damaged input: token files, llm.c debug states, the trainer's checkpoints.

Every damaged file gives a ValueError naming it (CheckpointError for checkpoints), checked against the file's
size before anything is allocated; a whole file reads back exactly. Hypothesis mutates headers and bytes.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc_lessons import data
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.train import DEFAULTS, CheckpointError, Trainer, read_checkpoint
from llmc_lessons.verify import read_debug_state, write_debug_state

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
INT32 = st.one_of(st.integers(-3, 40), st.sampled_from([-2**31, 2**31 - 1, 2**30, 2**16, 20240520, 20240327]))
SMALL = GPT2Config(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=1, num_heads=2, channels=8)


def _patched(raw: bytes, offset: int, value: int) -> bytes:
    b = bytearray(raw)
    b[offset:offset + 4] = np.array([value], "<i4").tobytes()
    return bytes(b)


def _cut(raw: bytes, how: str, at: float) -> bytes:
    if how == "truncate":
        return raw[: int(at * len(raw))]
    if how == "append":
        return raw + b"\x00" * (1 + int(at * 9))
    return raw


# -- token files ------------------------------------------------------------------------------------------


@FUZZ
@given(field=st.sampled_from([0, 1, 2]), value=INT32, how=st.sampled_from(["keep", "truncate", "append"]),
       at=st.floats(0, 1))
def test_fuzz_read_tokens(tmp_path_factory, field, value, how, at):
    tokens = np.arange(7, dtype=np.uint16) * 1000
    raw = _cut(_patched(data.token_file_bytes(tokens), 4 * field, value), how, at)
    path = tmp_path_factory.mktemp("tok") / "t.bin"
    path.write_bytes(raw)
    try:
        got = data.read_tokens(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    header = np.frombuffer(raw[:12], "<i4")
    assert header[0] == data.MAGIC and header[1] == data.VERSION and len(raw) == 1024 + 2 * header[2]
    np.testing.assert_array_equal(got, np.frombuffer(raw[1024:], "<u2"))


# -- llm.c debug states -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("state") / "state.bin"
    idx = np.arange(6, dtype=np.int32).reshape(2, 3)
    write_debug_state(path, GPT2(SMALL, seed=1, backend="numpy"), idx, (idx + 1) % SMALL.vocab_size)
    return path.read_bytes()


def test_a_debug_state_with_B_0_is_diagnosed_as_a_damaged_header(tmp_path, state_bytes):
    path = tmp_path / "s.bin"
    path.write_bytes(_patched(state_bytes, 8, 0))
    with pytest.raises(ValueError, match=r"s.bin: the header says B = 0, T = 3; .* the header is damaged"):
        read_debug_state(path, SMALL)


def test_a_debug_state_header_is_checked_against_the_size_before_allocating(tmp_path, state_bytes):
    path = tmp_path / "s.bin"
    path.write_bytes(_patched(state_bytes, 8, 2**30))     # B * T * V floats would be 16 GiB
    with pytest.raises(ValueError, match=r"B = 1073741824, T = 3 .* should be 502,511,180,004 bytes, "
                                         r"but it is 7,308: it ends inside x"):
        read_debug_state(path, SMALL)
    path.write_bytes(_patched(state_bytes, 12, 17))
    with pytest.raises(ValueError, match="T = 17, longer than the model's context of 16"):
        read_debug_state(path, SMALL)
    path.write_bytes(state_bytes + b"\0\0\0\0")
    with pytest.raises(ValueError, match="belongs to a larger model, or has data appended"):
        read_debug_state(path, SMALL)
    path.write_bytes(state_bytes[:100])
    with pytest.raises(ValueError, match="100 bytes is too short for the 1024-byte header"):
        read_debug_state(path, SMALL)


@FUZZ
@given(field=st.sampled_from([0, 1, 2, 3]), value=INT32, how=st.sampled_from(["keep", "truncate", "append"]),
       at=st.floats(0, 1))
def test_fuzz_read_debug_state(tmp_path_factory, state_bytes, field, value, how, at):
    raw = _cut(_patched(state_bytes, 4 * field, value), how, at)
    path = tmp_path_factory.mktemp("st") / "s.bin"
    path.write_bytes(raw)
    try:
        state = read_debug_state(path, SMALL)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert len(raw) == len(state_bytes) and state["x"].shape == (state["B"], state["T"])


# -- the trainer's checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(bytes, read_checkpoint's dict) of a checkpoint that train.py writes, of a model of a few KB."""
    root = tmp_path_factory.mktemp("run")
    data.write_tokens(root / "t.bin", np.arange(200, dtype=np.uint16) % SMALL.vocab_size)
    args = dict(DEFAULTS, model="tiny", batch_size=2, seq_len=8, steps=1, warmup=1, reference=True,
                train_bin=str(root / "t.bin"), out=str(root / "out"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GPT2Config, "from_name", classmethod(lambda cls, name: SMALL))
        Trainer(args).run(progress=False)
    path = root / "out" / "ckpt_000001.npz"
    return path.read_bytes(), read_checkpoint(path)


@FUZZ
@given(how=st.sampled_from(["flip", "truncate", "append", "zero"]), at=st.floats(0, 1), byte=st.integers(1, 255))
def test_fuzz_read_checkpoint(tmp_path_factory, checkpoint, how, at, byte):
    good_bytes, good = checkpoint
    raw = bytearray(good_bytes)
    i = min(int(at * len(raw)), len(raw) - 1)
    if how == "flip":
        raw[i] ^= byte
    elif how == "zero":
        raw[i:i + 64] = bytes(len(raw[i:i + 64]))
    else:
        raw = _cut(bytes(raw), how, at)
    path = tmp_path_factory.mktemp("ck") / "ckpt_000001.npz"
    path.write_bytes(bytes(raw))
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    # a change that the archive's checks cannot see (in a name's padding, after the archive) changes no value
    for key in ("params", "m", "v"):
        np.testing.assert_array_equal(state[key], good[key])
    assert state["meta"] == good["meta"]
