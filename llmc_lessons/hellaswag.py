"""HellaSwag accuracy, as llm.c measures it: `python -m llmc_lessons.hellaswag --model FILE --data FILE`.

HellaSwag (Zellers et al., 2019) gives a context and several endings, one of them right. The model does not
answer; it scores: each ending is appended to the context, and the ending whose tokens the model finds least
surprising, by the mean cross-entropy loss over the ending's tokens alone, is its pick. The mean (not the sum)
keeps long endings from losing just for being long; llm.c's dev/data/hellaswag.py calls this acc_norm.

The data file is the HellaSwag jsonl format, one example per line: {"ctx": str, "endings": [str, ...],
"label": int}, other fields ignored. Nothing downloads: fetch hellaswag_val.jsonl yourself (README.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from llmc_lessons import device
from llmc_lessons.model import GPT2
from llmc_lessons.tokenizer import gpt2


class Example(NamedTuple):
    """One HellaSwag example: the context, the candidate endings, the index of the right one, where it is from."""
    ctx: str
    endings: list
    label: int
    where: str


def read_examples(path: str | Path) -> Iterator[Example]:
    """The examples of a HellaSwag jsonl file, each checked, with errors that name the file and line."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}: line {lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from None
            if not isinstance(record, dict) or not {"ctx", "endings", "label"} <= set(record):
                raise ValueError(f"{where}: a HellaSwag example has the fields ctx, endings and label")
            ctx, endings, label = record["ctx"], record["endings"], record["label"]
            if not isinstance(ctx, str) or not ctx.strip():
                raise ValueError(f"{where}: ctx must be a non-empty string")
            if not isinstance(endings, list) or len(endings) < 2 or \
                    not all(isinstance(e, str) and e.strip() for e in endings):
                raise ValueError(f"{where}: endings must be a list of at least 2 non-empty strings")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
                raise ValueError(f"{where}: label must be an int in [0, {len(endings)}), got {label!r}")
            yield Example(ctx, endings, label, where)


def render_example(example: Example, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens (K, T) int32: context + " " + ending k, padded; mask (K, T) bool: True at the ending's tokens.

    T is the longest row rounded up to a multiple of 8 (the bf16 kernels' unit) and at most max_len; a row that
    is too long loses tokens from the start of its context, never from its ending.
    """
    enc = gpt2()
    ctx = enc.encode_ordinary(example.ctx)
    rows = []
    for ending in example.endings:
        end = enc.encode_ordinary(" " + ending)   # GPT-2 tokens carry their leading space
        if len(end) >= max_len:
            raise ValueError(f"{example.where}: an ending of {len(end)} tokens does not fit the model's context "
                             f"of {max_len}")
        rows.append((ctx[-(max_len - len(end)):], end))
    T = min(max_len, -(-max(len(c) + len(e) for c, e in rows) // 8) * 8)
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for k, (c, e) in enumerate(rows):
        tokens[k, :len(c) + len(e)] = c + e
        mask[k, len(c):len(c) + len(e)] = True
    return tokens, mask


def ending_losses(model: GPT2, example: Example) -> np.ndarray:
    """(K,): for each ending, the mean loss of predicting its tokens from the context and the ending so far."""
    tokens, mask = render_example(example, model.config.max_seq_len)
    # position t predicts token t+1: the inputs are tokens[:, :-1], and the loss at t counts when t+1 is an ending's
    inputs = np.concatenate([tokens[:, :-1], tokens[:, -1:]], axis=1)   # keep T (the last position is masked)
    targets = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    counted = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)
    model.forward(inputs, targets)
    losses = device.to_host(model.losses).astype(np.float64)           # (K, T)
    return (losses * counted).sum(axis=1) / counted.sum(axis=1)


def evaluate(model: GPT2, path: str | Path, limit: int | None = None, progress: bool = True) -> dict:
    """HellaSwag accuracy of `model` on the examples in `path` (the first `limit` of them)."""
    from itertools import islice

    from tqdm.auto import tqdm
    correct = total = 0
    bar = tqdm(islice(read_examples(path), limit), total=limit, disable=not progress, unit="example")
    for example in bar:
        total += 1
        correct += int(np.argmin(ending_losses(model, example)) == example.label)
        bar.set_postfix(acc=f"{correct / total:.4f}")
    bar.close()
    if total == 0:
        raise ValueError(f"{path}: no examples")
    return {"examples": total, "correct": correct, "accuracy": correct / total}


def main(argv=None) -> int:
    import argparse

    from llmc_lessons.hf import load_weights
    p = argparse.ArgumentParser(prog="python -m llmc_lessons.hellaswag", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an llm.c model file or a Hugging Face GPT-2 folder")
    p.add_argument("--data", required=True, help="a HellaSwag jsonl file, e.g. hellaswag_val.jsonl")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    try:
        model = load_weights(args.model)
        result = evaluate(model, args.data, limit=args.limit)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"HellaSwag: {result['correct']}/{result['examples']} right, accuracy {result['accuracy']:.4f} "
          f"(chance is 1/4 with 4 endings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
