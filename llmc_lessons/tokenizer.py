"""GPT-2's byte-pair encoding (BPE) through tiktoken, loaded offline from a rank file shipped in the package.

GPT-2 turns text into integer token ids in two steps:
1. a regular expression (`PAT_STR`) cuts the text into chunks: words with their leading space, runs of
   digits, runs of punctuation, runs of whitespace;
2. each chunk, as UTF-8 bytes, starts as one token per byte and is merged pairwise: at every step the
   adjacent pair whose concatenation has the lowest rank in the rank file is merged, until no adjacent pair
   is in the file. The rank of the final piece is its token id.

The rank file `assets/gpt2.tiktoken` (50,256 lines "base64(bytes) rank") comes from the openai-whisper
package (see assets/PROVENANCE.md). Token 50256 is the special token <|endoftext|>, so V = 50257.
llm.c pads the vocabulary to Vp = 50304 (a multiple of 128) so the matmuls of the last layer tile evenly.

`gpt2()` is the real tokenizer (fast, Rust, through tiktoken). `bpe_encode` and `bpe_merge_steps` are a
slow pure-Python version of the same algorithm, for reading and for testing the real one.
"""
from __future__ import annotations

import base64
import hashlib
import html
from functools import lru_cache
from pathlib import Path

import regex

ASSETS = Path(__file__).resolve().parent / "assets"
RANKS_FILE = ASSETS / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""sha256 of gpt2.tiktoken; also the hash tiktoken itself expects for r50k_base, the same ranks as "gpt2"."""

PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
"""tiktoken's pattern for GPT-2 (r50k_pat_str): the original GPT-2 pattern, rewritten to run faster."""

EOT = 50256
"""<|endoftext|>: separates documents; llm.c's token files start every document with it."""
EOT_TEXT = "<|endoftext|>"
V = 50257
"""Vocabulary size: 50,256 byte-pair tokens + <|endoftext|>."""
Vp = 50304
"""V padded up to a multiple of 128, as llm.c does; rows V..Vp-1 of wte are never used by real tokens."""


def load_ranks(path: str | Path = RANKS_FILE, expected_sha256: str | None = RANKS_SHA256) -> dict[bytes, int]:
    """Read a .tiktoken rank file ("base64(bytes) rank" per line) into {token bytes: rank}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rank file {path} is missing: the package install is incomplete "
                                f"(it ships llmc_lessons/assets/gpt2.tiktoken)")
    data = path.read_bytes()
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise ValueError(f"rank file {path} has sha256 {got}, expected {expected_sha256}: "
                             f"the file is damaged or is not GPT-2's rank file")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            piece, rank = line.split()
            ranks[base64.b64decode(piece, validate=True)] = int(rank)
        except Exception as e:
            raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:60]!r}") from e
    return ranks


@lru_cache(maxsize=None)
def _ranks() -> dict[bytes, int]:
    return load_ranks()


@lru_cache(maxsize=None)
def gpt2():
    """GPT-2's tokenizer as a `tiktoken.Encoding`, built offline from the shipped rank file (cached)."""
    import tiktoken
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=_ranks(),
                             special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=V)


def encode(text: str) -> list[int]:
    """Token ids of `text`; the literal string <|endoftext|> becomes EOT (as llm.c's data scripts allow)."""
    return gpt2().encode(text, allowed_special={EOT_TEXT})


def decode(tokens) -> str:
    """The text of a sequence of token ids (invalid UTF-8 across a cut shows as U+FFFD)."""
    return gpt2().decode([int(t) for t in tokens])


def token_bytes(token: int) -> bytes:
    """The bytes one token id stands for (EOT gives b'<|endoftext|>')."""
    return gpt2().decode_single_token_bytes(int(token))


# --- the same algorithm in plain Python, for reading ---------------------------------------------------


def pretokenize(text: str) -> list[str]:
    """Step 1: the chunks GPT-2's regex cuts `text` into; BPE never merges across two chunks."""
    return regex.findall(PAT_STR, text)


def bpe_merge_steps(chunk: bytes, ranks: dict[bytes, int] | None = None) -> list[list[bytes]]:
    """Step 2 on one chunk, recorded: the list of pieces before each merge and after the last one.

    Starts from one piece per byte; each step merges the adjacent pair whose concatenation has the lowest
    rank (the merge GPT-2 learned first), until no adjacent pair is in the vocabulary.
    """
    ranks = _ranks() if ranks is None else ranks
    pieces = [bytes([b]) for b in chunk]
    steps = [list(pieces)]
    while len(pieces) > 1:
        best, best_rank = None, None
        for i in range(len(pieces) - 1):
            r = ranks.get(pieces[i] + pieces[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        pieces = pieces[:best] + [pieces[best] + pieces[best + 1]] + pieces[best + 2:]
        steps.append(list(pieces))
    return steps


def bpe_encode(text: str) -> list[int]:
    """Pure-Python GPT-2 encoding (slow; for short strings): regex chunks, then merges by rank.

    <|endoftext|> in the text becomes EOT, like `encode`.
    """
    ranks = _ranks()
    ids: list[int] = []
    for k, part in enumerate(text.split(EOT_TEXT)):
        if k:
            ids.append(EOT)
        for chunk in pretokenize(part):
            ids.extend(ranks[p] for p in bpe_merge_steps(chunk.encode("utf-8"), ranks)[-1])
    return ids


# --- seeing tokens --------------------------------------------------------------------------------------

_COLOURS = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d7f2e3", "#fce1c8", "#d9eef7"]


def show_bytes(piece: bytes) -> str:
    """A token's bytes made visible: space as '␣', newline as '↵', tab as '⇥', other non-printables as \\xNN."""
    out = []
    for b in piece:
        c = chr(b)
        if c == " ":
            out.append("␣")
        elif c == "\n":
            out.append("↵")
        elif c == "\t":
            out.append("⇥")
        elif 32 < b < 127:
            out.append(c)
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def tokens_html(text: str, max_tokens: int = 2000) -> str:
    """HTML that shows `text` cut into tokens: each token a coloured box with its bytes and, below, its id."""
    ids = encode(text)
    shown = ids[:max_tokens]
    n_bytes = len(text.encode("utf-8"))
    head = (f"<div style='font-family:sans-serif;margin-bottom:6px'><b>{len(ids)}</b> tokens, "
            f"<b>{n_bytes}</b> UTF-8 bytes, <b>{len(text)}</b> characters"
            + (f" ({n_bytes / len(ids):.2f} bytes per token)" if ids else "") + "</div>")
    boxes = []
    for i, t in enumerate(shown):
        colour = "#f4cccc" if t == EOT else _COLOURS[i % len(_COLOURS)]
        piece = html.escape(show_bytes(token_bytes(t)))
        boxes.append(f"<span style='display:inline-block;background:{colour};margin:1px;padding:1px 3px;"
                     f"border-radius:3px;text-align:center;font-family:monospace'>{piece}"
                     f"<br><span style='font-size:75%;color:#555'>{t}</span></span>")
    more = f"<div>... {len(ids) - len(shown)} more tokens</div>" if len(ids) > len(shown) else ""
    return head + "<div style='line-height:2.2'>" + "".join(boxes) + "</div>" + more


def explore(text: str = "Hello world! Tokens are bytes merged by rank: 2025, naïve, 日本, <|endoftext|>"):
    """An ipywidgets explorer: type text, see its GPT-2 tokens coloured, with their byte pieces and ids."""
    import ipywidgets as widgets

    box = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="95%", height="80px"))
    out = widgets.HTML(value=tokens_html(text))

    def on_change(change):
        out.value = tokens_html(change["new"])

    box.observe(on_change, names="value")
    return widgets.VBox([box, out])
