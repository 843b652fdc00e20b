"""GPT-2's tokenizer: the shipped rank file, equivalence with tiktoken's gpt2, the pure-Python BPE, the explorer."""
import hashlib

import pytest

from llmc_lessons import tokenizer as tk

TEXTS = [
    "Hello world",
    "",
    " ",
    "\n\n\n",
    "To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind to suffer",
    "I'll, you've, we're, they'd, she's, I'm, it'll -- CAN'T DON'T",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1e-5 2025-06-25",
    "tabs\tand\t\tspaces   and  trailing   \n  indented\r\nwindows line",
    "naïve café façade Ångström – em—dash “quotes” ‘single’ …",
    "日本語のテキスト 中文 한국어 Ελληνικά русский العربية עברית हिन्दी",
    "emoji 🤗🚀👩‍👩‍👧 and combining e\u0301 and zero\u200bwidth",
    "code: def f(x):\n    return x**2  # comment\n\tif a!=b: {'k': [1, 2]}",
    "<|endoftext|>First document.<|endoftext|>Second document.",
    "<|endoftext|>",
    "a" * 300 + " " + "ab" * 100,
    "\x00\x01\x7f control bytes \ufffd replacement",
]


def test_rank_file_matches_provenance():
    data = tk.RANKS_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == tk.RANKS_SHA256
    provenance = (tk.ASSETS / "PROVENANCE.md").read_text()
    assert digest in provenance
    assert "Copyright (c) 2022 OpenAI" in provenance
    assert len(data.splitlines()) == 50256


def test_pattern_is_tiktokens_gpt2_pattern():
    from tiktoken_ext import openai_public  # a plain import: defines functions, downloads nothing
    assert tk.PAT_STR == openai_public.r50k_pat_str


def test_encoding_properties():
    enc = tk.gpt2()
    assert enc is tk.gpt2()                   # cached
    assert enc.name == "gpt2"
    assert enc.n_vocab == tk.V == 50257
    assert enc.eot_token == tk.EOT == 50256
    assert enc.max_token_value == 50256
    assert tk.Vp == 50304 and tk.Vp % 128 == 0 and tk.Vp >= tk.V
    assert enc.special_tokens_set == {"<|endoftext|>"}


def test_known_ids():
    enc = tk.gpt2()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("\n") == [198]
    assert enc.encode("\n\n") == [628]
    assert enc.encode("The") == [464]
    assert enc.encode(",") == [11] and enc.encode(".") == [13]
    assert enc.encode("!") == [0]             # rank 0: the first printable byte
    assert tk.encode("<|endoftext|>") == [50256]


@pytest.mark.parametrize("text", TEXTS)
def test_fast_and_pure_python_bpe_agree(text):
    ids = tk.encode(text)
    assert ids == tk.bpe_encode(text)
    assert tk.decode(ids) == text                                 # lossless round trip
    assert b"".join(tk.token_bytes(t) for t in ids) == text.encode("utf-8")


def test_special_token_is_refused_unless_allowed():
    enc = tk.gpt2()
    with pytest.raises(ValueError):
        enc.encode("a <|endoftext|> b")       # tiktoken's default, same as for its own gpt2
    assert 50256 not in enc.encode_ordinary("a <|endoftext|> b")
    assert enc.encode("a <|endoftext|> b", allowed_special={"<|endoftext|>"}).count(50256) == 1


def test_pretokenize_and_merge_steps():
    assert tk.pretokenize("Who's there?  12") == ["Who", "'s", " there", "?", " ", " 12"]
    steps = tk.bpe_merge_steps(b" tokenization")
    assert steps[0] == [bytes([b]) for b in b" tokenization"]
    assert steps[-1] == [b" token", b"ization"]
    assert all(len(a) == len(b) + 1 for a, b in zip(steps, steps[1:]))   # one merge per step
    assert all(b"".join(s) == b" tokenization" for s in steps)


def test_load_ranks_errors(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="sha256"):
        tk.load_ranks(bad)
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        tk.load_ranks(bad, expected_sha256=None)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tk.load_ranks(tmp_path / "missing.tiktoken")


def test_tokens_html_and_explorer():
    page = tk.tokens_html("Hello world<|endoftext|>\n日本")
    assert page.count("border-radius") == len(tk.encode("Hello world<|endoftext|>\n日本"))
    assert ">15496<" in page and ">995<" in page and ">50256<" in page
    assert "␣world" in page and "↵" in page and "\\xe6" in page
    assert "&lt;|endoftext|&gt;" in page                # escaped, not raw HTML
    w = tk.explore("Hello")
    box, out = w.children
    box.value = "Hello world"
    assert ">995<" in out.value                          # the HTML follows the text box
