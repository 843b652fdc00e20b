"""HellaSwag scoring: each ending's mean loss against an independent NumPy GPT-2, accuracy, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from test_hf import TRAIN_CONFIG, numpy_gpt2_logits, random_hf_tensors, write_hf

from llmc_lessons import hellaswag, hf
from llmc_lessons.tokenizer import gpt2

EXAMPLES = Path(__file__).parent / "hellaswag_examples.jsonl"   # hand-written, in HellaSwag's jsonl format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_hf(tmp_path_factory.mktemp("hs") / "gpt2-random", random_hf_tensors(TRAIN_CONFIG), TRAIN_CONFIG)
    return hf.load_hf(folder, backend="numpy"), random_hf_tensors(TRAIN_CONFIG)


def independent_mean_loss(tensors, ctx, ending):
    """The mean over the ending's tokens of -log p(token | everything before it), from the HF tensors."""
    enc = gpt2()
    c, e = enc.encode_ordinary(ctx), enc.encode_ordinary(" " + ending)
    tokens = np.array([c + e])
    logits = numpy_gpt2_logits(tensors, TRAIN_CONFIG, tokens)[0]            # (T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.mean([logp[t - 1, tokens[0, t]] for t in range(len(c), len(c) + len(e))])


def test_examples_file_is_in_the_hellaswag_format():
    examples = list(hellaswag.read_examples(EXAMPLES))
    assert len(examples) == 5 and [len(e.endings) for e in examples] == [4, 4, 4, 4, 2]
    assert [e.label for e in examples] == [0, 1, 2, 3, 0]
    raw = json.loads(EXAMPLES.read_text().splitlines()[0])
    assert {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "label", "endings"} <= set(raw)


def test_ending_losses_match_an_independent_computation(tiny):
    model, tensors = tiny
    for example in hellaswag.read_examples(EXAMPLES):
        got = hellaswag.ending_losses(model, example)
        want = [independent_mean_loss(tensors, example.ctx, e) for e in example.endings]
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_render_pads_and_truncates_the_context_only():
    ex = hellaswag.Example("one two three four five six seven eight nine ten", ["eleven", "twelve thirteen"], 0, "x")
    tokens, mask = hellaswag.render_example(ex, max_len=64)
    assert tokens.shape == (2, 16) and mask.sum(1).tolist() == [1, 2]
    assert tokens[0, :11].tolist() == gpt2().encode_ordinary(ex.ctx + " eleven")
    tokens, mask = hellaswag.render_example(ex, max_len=6)
    assert tokens.shape == (2, 6)
    enc = gpt2()
    assert tokens[1].tolist() == enc.encode_ordinary(ex.ctx)[-4:] + enc.encode_ordinary(" twelve thirteen")
    with pytest.raises(ValueError, match="x: an ending of 2 tokens does not fit the model's context of 2"):
        hellaswag.render_example(ex, max_len=2)


def test_accuracy_counts_the_endings_with_the_lowest_mean_loss(tiny):
    model, tensors = tiny
    picks = [int(np.argmin([independent_mean_loss(tensors, e.ctx, end) for end in e.endings])) == e.label
             for e in hellaswag.read_examples(EXAMPLES)]
    result = hellaswag.evaluate(model, EXAMPLES, progress=False)
    assert result == {"examples": 5, "correct": sum(picks), "accuracy": sum(picks) / 5}
    assert hellaswag.evaluate(model, EXAMPLES, limit=2, progress=False)["examples"] == 2


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["b", "c"]}', "line 2: a HellaSwag example has the fields ctx, endings and label"),
    ('{"ctx": "a", "endings": ["b"], "label": 0}', "line 2: endings must be a list of at least 2"),
    ('{"ctx": "a", "endings": ["b", ""], "label": 0}', "line 2: endings must be a list of at least 2 non-empty"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', r"line 2: label must be an int in \[0, 2\), got 2"),
    ('{"ctx": "", "endings": ["b", "c"], "label": 0}', "line 2: ctx must be a non-empty string"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0', "line 2: not a JSON line"),
])
def test_bad_examples_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(EXAMPLES.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: " + message):
        list(hellaswag.read_examples(path))


def test_command_line(tiny, tmp_path, capsys):
    model, _ = tiny
    path = model.save_llmc_checkpoint(tmp_path / "m.bin")
    assert hellaswag.main(["--model", str(path), "--data", str(EXAMPLES), "--limit", "3"]) == 0
    assert "/3 right" in capsys.readouterr().out
    (tmp_path / "empty.jsonl").write_text("\n")
    assert hellaswag.main(["--model", str(path), "--data", str(tmp_path / "empty.jsonl")]) == 1
    assert "empty.jsonl: no examples" in capsys.readouterr().err


@pytest.mark.parametrize("precision, rtol", [("fp32", 2e-3), ("bf16", 3e-2)])   # a GPU may use TF32
def test_kernel_paths_score_as_the_reference(tiny, tmp_path, precision, rtol):
    model, _ = tiny
    folder = hf.save_hf(model, tmp_path / "m")
    example = next(hellaswag.read_examples(EXAMPLES))
    kernels = hf.load_hf(folder, backend="kernels", precision=precision)
    np.testing.assert_allclose(hellaswag.ending_losses(kernels, example), hellaswag.ending_losses(model, example),
                               rtol=rtol)
