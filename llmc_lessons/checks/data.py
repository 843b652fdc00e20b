"""Checks for lesson 01 (tokens and data): Exercise 1.1 (an llm.c token file's bytes), Exercise 1.2 (get_batch)."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import ExerciseFailed, assert_close, passed, rng, run_exercise
from llmc_lessons.data import HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, get_batch, token_file_bytes
from llmc_lessons.device import to_host
from llmc_lessons.tokenizer import V


def _as_array(ex: str, name: str, a) -> np.ndarray:
    if a is None:
        raise ExerciseFailed(f"{ex} ({name}): got None. Did your function forget to `return` it?")
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise ExerciseFailed(f"{ex} ({name}): expected a NumPy array, got {type(a).__name__}")
    return np.asarray(to_host(a))


def _describe_length(n: int, N: int) -> str | None:
    """A likely cause for a token file of n bytes holding N tokens (it should be 1024 + 2N)."""
    options = {HEADER_BYTES + 4 * N: "each token took 4 bytes: store the tokens as uint16 (2 bytes each), "
                                     "e.g. np.asarray(tokens, dtype=np.uint16).tobytes()",
               HEADER_BYTES + 8 * N: "each token took 8 bytes (int64, NumPy's default integer): store the "
                                     "tokens as uint16, e.g. np.asarray(tokens, dtype=np.uint16).tobytes()",
               HEADER_BYTES + N: "each token took 1 byte: uint8 cannot hold ids up to 50256; use uint16",
               HEADER_INTS + 2 * N: "the header is 256 bytes, but it is 256 int32 numbers = 1024 bytes",
               2 * HEADER_BYTES + 2 * N: "the header is 2048 bytes: it must be 256 int32 (4 bytes each), "
                                         "not int64",
               12 + 2 * N: "the header holds only the 3 numbers; llm.c pads it with zeros to 256 int32",
               2 * N: "there is no header: the file starts with 256 int32 (magic, version, count, zeros)"}
    return options.get(n)


def check_token_file_bytes(fn) -> None:
    """Exercise 1.1: fn(tokens) -> the bytes of an llm.c token file (header of 256 int32, then uint16 tokens)."""
    ex = "Exercise 1.1"
    gen = rng()
    N = int(gen.integers(30, 60))
    ids = gen.integers(0, V, size=N)
    ids[:3] = [50256, 40000, 300]          # EOT, an id above 32767, an id above 255
    cases = [("an int64 NumPy array", ids.copy()), ("a Python list", [int(t) for t in ids[: N - 7]])]
    for what, tokens in cases:
        n = len(tokens)
        want = token_file_bytes(tokens)
        got = run_exercise(ex, fn, tokens.copy())
        if isinstance(got, np.ndarray):
            raise ExerciseFailed(f"{ex}: got a NumPy array; return bytes (call .tobytes() on each part and "
                                 f"join them with +).")
        if not isinstance(got, (bytes, bytearray, memoryview)):
            raise ExerciseFailed(f"{ex}: expected bytes, got {type(got).__name__}"
                                 + (". Did your function forget to `return` it?" if got is None else ""))
        got = bytes(got)
        if len(got) != len(want):
            cause = _describe_length(len(got), n)
            raise ExerciseFailed(f"{ex}: for {n} tokens ({what}) the file must be {HEADER_BYTES} + 2*{n} = "
                                 f"{len(want)} bytes, got {len(got)}."
                                 + (f"\n  likely cause: {cause}" if cause else ""))
        header = np.frombuffer(got[:HEADER_BYTES], dtype="<i4")
        if header[0] != MAGIC:
            swapped = int(np.frombuffer(got[:4], dtype=">i4")[0]) == MAGIC
            raise ExerciseFailed(f"{ex}: header[0] (the magic number) must be {MAGIC}, got {int(header[0])}."
                                 + ("\n  likely cause: the bytes are big-endian; llm.c reads little-endian "
                                    "int32 ('<i4', NumPy's native order on x86 and ARM)" if swapped else ""))
        if header[1] != VERSION:
            raise ExerciseFailed(f"{ex}: header[1] (the version) must be {VERSION}, got {int(header[1])}.")
        if header[2] != n:
            guess = {2 * n: "that is the size in bytes; llm.c stores the number of tokens",
                     n + 1: "one too many: count the tokens you write, nothing else",
                     n - 1: "one too few: count every token",
                     HEADER_INTS + n: "the header is not part of the count"}.get(int(header[2]))
            raise ExerciseFailed(f"{ex}: header[2] must be the number of tokens, {n}, got {int(header[2])}."
                                 + (f"\n  likely cause: {guess}" if guess else ""))
        if np.any(header[3:]):
            raise ExerciseFailed(f"{ex}: header[3:] must be zeros, but {int(np.count_nonzero(header[3:]))} of "
                                 f"the 253 are not (np.empty leaves garbage; use np.zeros(256, dtype=np.int32)).")
        body = np.frombuffer(got[HEADER_BYTES:], dtype="<u2").astype(np.int64)
        expected = np.asarray(tokens, dtype=np.int64)
        big_endian = np.frombuffer(got[HEADER_BYTES:], dtype=">u2").astype(np.int64)
        if np.array_equal(big_endian, expected) and not np.array_equal(body, expected):
            raise ExerciseFailed(f"{ex}: the tokens are big-endian; llm.c reads little-endian uint16 ('<u2', "
                                 f"NumPy's native order on x86 and ARM).")
        assert_close(ex, "tokens after the header", body, expected, atol=0, rtol=0, known_mistakes={
            "the tokens are in reverse order": expected[::-1],
            "the tokens were sorted: write them in the order of the text": np.sort(expected),
        }, hint="after the 1024-byte header come the tokens, in order, as uint16.")
    passed(ex, f"byte-for-byte equal to llm.c's format for {len(cases)} inputs (an array and a list)")


def check_get_batch(fn) -> None:
    """Exercise 1.2: fn(tokens, pos, B, T) -> (inputs, targets), each (B, T) int32, at several positions."""
    ex = "Exercise 1.2"
    gen = rng()
    N = int(gen.integers(400, 600))
    tokens = gen.integers(0, V, size=N).astype(np.uint16)
    cases = [(3, 7, int(gen.integers(1, N - 3 * 7 - 1))),   # somewhere in the middle
             (1, 5, 0),                                     # the very start, one row
             (4, 9, N - 4 * 9 - 1),                         # the last position with B*T+1 tokens left
             (5, 1, int(gen.integers(1, N - 6)))]           # T = 1: each row is a single token
    for B, T, pos in cases:
        result = run_exercise(ex, fn, tokens.copy(), pos, B, T)
        where = f"tokens of length {N}, pos={pos}, B={B}, T={T}"
        if not isinstance(result, tuple) or len(result) != 2:
            raise ExerciseFailed(f"{ex}: return the pair (inputs, targets), got {type(result).__name__}"
                                 + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
                                 + f" (for {where})")
        inputs, targets = (_as_array(ex, n, a) for n, a in zip(("inputs", "targets"), result))
        want_in, want_tg = get_batch(tokens, pos, B, T)
        t64 = tokens.astype(np.int64)

        def window(start, stride=T):
            """(B, T) rows of T tokens, row b starting at start + b*stride; None if it runs off the end."""
            if start < 0 or start + (B - 1) * stride + T > N:
                return None
            return np.stack([t64[start + b * stride: start + b * stride + T] for b in range(B)])

        def known(d):
            return {k: v for k, v in d.items() if v is not None and v.shape == (B, T)}

        assert_close(ex, "inputs", inputs, want_in, atol=0, rtol=0, known_mistakes=known({
            "inputs start one token late, at tokens[pos + 1]: the inputs begin at tokens[pos]": window(pos + 1),
            "`pos` was ignored: the batch must start at tokens[pos], not at tokens[0]": window(0),
            "rows and columns are mixed up (reshape(T, B).T or order='F'): row b must hold the T consecutive "
            "tokens pos + b*T ... pos + b*T + T - 1": t64[pos:pos + B * T].reshape(T, B).T,
            "row b starts at pos + b*(T+1): the rows are consecutive pieces of ONE buffer of B*T+1 tokens, so "
            "row b starts at pos + b*T": window(pos, T + 1),
        }), hint=f"the inputs are B*T consecutive tokens starting at position pos, row after row (here {where}).")

        assert_close(ex, "targets", targets, want_tg, atol=0, rtol=0, known_mistakes=known({
            "targets equal the inputs: the target of inputs[b, t] is the NEXT token, so targets are the "
            "same window shifted by one: tokens[pos + 1 : pos + 1 + B*T]": want_in,
            "targets are shifted by two tokens instead of one (tokens[pos + 2 : ...]): an off-by-one": window(pos + 2),
            "targets are shifted the wrong way (tokens[pos - 1 : ...]): each target comes AFTER its input":
                window(pos - 1),
            "each row was rolled on its own (np.roll(inputs, -1, axis=1)): the last target of row b is the "
            "first token of row b+1 (the token after it in the text), not the first token of row b":
                np.roll(want_in, -1, axis=1),
            "rows and columns are mixed up (reshape(T, B).T or order='F')":
                t64[pos + 1:pos + 1 + B * T].reshape(T, B).T,
        }), hint=f"targets[b, t] is the token that follows inputs[b, t] in the text (here {where}).")

        for name, a in (("inputs", inputs), ("targets", targets)):
            if a.dtype != np.int32:
                raise ExerciseFailed(f"{ex} ({name}): the values are right but the dtype is {a.dtype}; llm.c's "
                                     f"DataLoader hands the model int (int32) arrays, and the embedding kernels "
                                     f"read them as int. Convert with .astype(np.int32).")
    passed(ex, f"inputs and targets are right at {len(cases)} positions, including the last one of a "
               f"{N}-token array")
