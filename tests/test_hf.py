"""The Hugging Face GPT-2 <-> llm.c converter: a small random checkpoint in the Hugging Face layout, its round
trip, the course's logits against an independent NumPy GPT-2 (and against transformers when it is installed)."""
import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llmc_lessons import device, hf
from llmc_lessons.model import GPT2

HF_CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 32, "vocab_size": 101,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


def random_hf_tensors(cfg=HF_CONFIG, seed=0, buffers=True):
    """GPT-2's tensors as Hugging Face stores them: Conv1D weights (in, out), wte (V, C), the causal-mask buffers."""
    gen = np.random.default_rng(seed)
    C, L, V, maxT = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
    r = lambda *shape, s=0.1: (gen.standard_normal(shape) * s).astype(np.float32)
    t = {"wte.weight": r(V, C), "wpe.weight": r(maxT, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for l in range(L):
        p = f"h.{l}."
        t.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C),
                  p + "ln_2.bias": r(C), p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                  p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                  p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                  p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C)})
        if buffers:   # as in OpenAI's published model.safetensors
            t[p + "attn.bias"] = np.tril(np.ones((maxT, maxT), np.float32))[None, None]
            t[p + "attn.masked_bias"] = np.array(-1e4, np.float32)
    return t


def write_hf(folder, tensors, cfg=HF_CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def numpy_gpt2_logits(t, cfg, idx):
    """GPT-2's forward written from the Hugging Face layout alone: (B, T) token ids -> (B, T, V) logits."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    NH, L = cfg["n_head"], cfg["n_layer"]
    B, T = idx.shape

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["wte.weight"][idx] + t["wpe.weight"][:T]
    for l in range(L):
        p = lambda name: t[f"h.{l}.{name}"]
        h = ln(x, p("ln_1.weight"), p("ln_1.bias")) @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (a.reshape(B, T, NH, -1).transpose(0, 2, 1, 3) for a in np.split(h, 3, axis=-1))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v
        x = x + y.transpose(0, 2, 1, 3).reshape(B, T, -1) @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = gelu(ln(x, p("ln_2.weight"), p("ln_2.bias")) @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"))
        x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return ln(x, t["ln_f.weight"], t["ln_f.bias"]) @ t["wte.weight"].T


@pytest.fixture
def hf_folder(tmp_path):
    return write_hf(tmp_path / "gpt2-random", random_hf_tensors())


def tokens(B=3, T=20, V=101, seed=1):
    return np.random.default_rng(seed).integers(0, V, size=(B, T)).astype(np.int32)


def test_logits_match_an_independent_numpy_gpt2(hf_folder):
    model = hf.load_hf(hf_folder, backend="numpy")
    assert model.config.padded_vocab_size == 128 and model.config.max_seq_len == 32
    assert not model.params["wte"][101:].any()                       # the padded rows are zeros
    idx = tokens()
    model.forward(idx)
    want = numpy_gpt2_logits(random_hf_tensors(), HF_CONFIG, idx)
    np.testing.assert_allclose(model.logits[..., :101], want, atol=2e-5, rtol=1e-4)


def test_round_trip_is_exact(hf_folder, tmp_path):
    bin_path = hf.load_hf(hf_folder, backend="numpy").save_llmc_checkpoint(tmp_path / "model.bin")
    assert bin_path.stat().st_size == 1024 + 4 * GPT2.from_llmc_checkpoint(bin_path).num_parameters
    back = hf.save_hf(GPT2.from_llmc_checkpoint(bin_path, backend="numpy"), tmp_path / "back")
    original = {k: v for k, v in load_file(str(hf_folder / "model.safetensors")).items()
                if not k.endswith(hf._BUFFERS)}                        # the causal-mask buffers are not weights
    again = load_file(str(back / "model.safetensors"))
    assert sorted(again) == sorted(original)
    for k in original:
        assert again[k].dtype == np.float32 and np.array_equal(again[k], original[k]), k
    assert hf.config_from_hf(json.loads((back / "config.json").read_text())) == \
        hf.config_from_hf(HF_CONFIG)
    # and the llm.c file of the written folder is the same file, byte for byte
    assert hf.load_hf(back).save_llmc_checkpoint(tmp_path / "again.bin").read_bytes() == bin_path.read_bytes()


def test_prefixed_names_and_tied_lm_head_are_accepted(tmp_path):
    t = {"transformer." + k: v for k, v in random_hf_tensors(buffers=False).items()}
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    model = hf.load_hf(write_hf(tmp_path / "m", t), backend="numpy")
    plain = hf.load_hf(write_hf(tmp_path / "p", random_hf_tensors()), backend="numpy")
    assert np.array_equal(model.params_memory, plain.params_memory)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"h.1.attn.c_attn.weight": t["h.1.attn.c_attn.weight"].T.copy()}),
     r"model.safetensors: h.1.attn.c_attn.weight must have shape \(64, 192\), got \(192, 64\)"),
    (lambda t: t.update({"wte.weight": t["wte.weight"][:100].copy()}),
     r"wte.weight must have shape \(101, 64\), got \(100, 64\)"),
    (lambda t: t.update({"ln_f.bias": np.zeros(63, np.float32)}), r"ln_f.bias must have shape \(64,\), got \(63,\)"),
    (lambda t: t.pop("h.1.mlp.c_fc.bias"), r"tensor 'h.1.mlp.c_fc.bias' is missing"),
    (lambda t: t.update({"h.2.ln_1.weight": np.ones(64, np.float32)}), r"no place for: \['h.2.ln_1.weight'\]"),
    (lambda t: t.update({"lm_head.weight": t["wte.weight"] + 1}), r"lm_head.weight differs from wte.weight"),
    (lambda t: t.update({"wpe.weight": np.zeros((32, 64), np.int32)}), r"wpe.weight must hold floating-point"),
])
def test_bad_tensors_are_named(tmp_path, change, message):
    t = random_hf_tensors()
    change(t)
    with pytest.raises((ValueError, TypeError), match=message):
        hf.load_hf(write_hf(tmp_path / "bad", t))


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, r"activation_function = 'relu' is not supported: llm.c's GELU"),
    ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon"),
    ({"n_inner": 100}, r"n_inner = 100"),
    ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings"),
    ({"model_type": "llama"}, r"model_type is 'llama'; only GPT-2"),
    ({"n_layer": None}, r"missing \['n_layer'\]"),
])
def test_bad_configs_are_named(change, message):
    cfg = {k: v for k, v in {**HF_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ValueError, match="config.json: " + message):
        hf.config_from_hf(cfg)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing.*README"):
        hf.load_hf(tmp_path)
    write_hf(tmp_path / "x", random_hf_tensors())
    (tmp_path / "x" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: cannot read it as safetensors"):
        hf.load_hf(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no such llm.c model file or Hugging Face folder"):
        hf.load_weights(tmp_path / "nothing.bin")


def test_load_weights_takes_a_bin_or_a_folder(hf_folder, tmp_path):
    bin_path = hf.load_hf(hf_folder).save_llmc_checkpoint(tmp_path / "m.bin")
    a, b = hf.load_weights(bin_path, backend="numpy"), hf.load_weights(hf_folder, backend="numpy")
    assert np.array_equal(a.params_memory, b.params_memory)


def test_command_line(hf_folder, tmp_path, capsys):
    out = tmp_path / "m.bin"
    assert hf.main(["to-llmc", str(hf_folder), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    before = out.read_bytes()
    assert hf.main(["to-llmc", str(hf_folder), str(out)]) == 1          # never overwrites unasked
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert hf.main(["from-llmc", str(out), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    assert hf.main(["to-llmc", str(tmp_path / "nowhere"), str(tmp_path / "n.bin")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    assert not list(tmp_path.rglob(".*.tmp"))


def test_transformers_gives_the_same_logits(hf_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    idx = tokens()
    ours = hf.load_hf(hf_folder, backend="numpy")
    ours.forward(idx)
    # the folder the converter writes from an llm.c file loads in transformers too
    written = hf.save_hf(ours, tmp_path / "written")
    for folder in (hf_folder, written):
        ref = transformers.GPT2LMHeadModel.from_pretrained(str(folder), attn_implementation="eager").eval()
        with torch.no_grad():
            logits = ref(torch.from_numpy(idx).long()).logits.numpy()
        np.testing.assert_allclose(ours.logits[..., :101], logits, atol=2e-5, rtol=1e-4)


# --- python -m llmc_lessons.train --init-from ---------------------------------------------------------------

TRAIN_CONFIG = {**HF_CONFIG, "vocab_size": 50257, "n_positions": 64}


@pytest.fixture
def init_run(tmp_path):
    """A Hugging Face folder with GPT-2's vocabulary, its llm.c file, and token files to fine-tune on."""
    from llmc_lessons.data import write_tokens
    folder = write_hf(tmp_path / "gpt2-random", random_hf_tensors(TRAIN_CONFIG), TRAIN_CONFIG)
    bin_path = hf.load_hf(folder).save_llmc_checkpoint(tmp_path / "gpt2-random.bin")
    phrase = np.random.default_rng(0).integers(0, 50257, size=50)
    write_tokens(tmp_path / "train.bin", np.tile(phrase, 20).astype(np.uint16))
    write_tokens(tmp_path / "val.bin", np.tile(phrase, 4).astype(np.uint16))
    return folder, bin_path, tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_training_starts_from_the_weights_with_a_fresh_optimizer(init_run, precision, tol):
    from llmc_lessons.data import DataLoader
    from llmc_lessons.train import DEFAULTS, Trainer
    folder, _, tmp = init_run
    args = dict(DEFAULTS, batch_size=2, seq_len=16, steps=2, warmup=1, train_bin=str(tmp / "train.bin"),
                val_bin=str(tmp / "val.bin"), out=str(tmp / precision), init_from=str(folder), precision=precision,
                tf32=0)
    t = Trainer(args)
    start = hf.load_hf(folder, backend="numpy")
    assert t.model.config == start.config and t.model.precision == precision
    assert np.array_equal(device.to_host(t.model.params_memory), start.params_memory)
    assert t.model.step == 0 and t.model.m_memory is None                      # AdamW starts afresh
    x, y = DataLoader(tmp / "train.bin", 2, 16, seed=args["seed"], shuffle=True).next_batch()
    first = t.train_step()
    assert first.loss == pytest.approx(start.forward(x, y), rel=tol)            # the first step saw these weights


def test_command_line_init_from(init_run, capsys):
    from llmc_lessons.train import main
    folder, bin_path, tmp = init_run
    base = ["-b", "2", "-t", "16", "--train-bin", str(tmp / "train.bin"), "--val-bin", str(tmp / "val.bin"),
            "--reference", "--steps", "1"]
    assert main(base + ["--init-from", str(bin_path)]) == 0
    assert "L=2, NH=4, C=64, maxT=64" in capsys.readouterr().out
    for extra, message in ([["--resume", str(tmp)], "--init-from starts a new run from weights, --resume"],
                           [["--model", "d12"], "the weights set the model's size, so leave out --model"],
                           [[], "nowhere: no such llm.c model file or Hugging Face folder"]):
        with pytest.raises(SystemExit):
            main(base + ["--init-from", str(bin_path if extra else tmp / "nowhere")] + extra)
        assert message in capsys.readouterr().err
    # a run started from weights stops and resumes like any other
    run = ["--init-from", str(bin_path), "--steps", "2", "--stop-at", "1", "--out", str(tmp / "run")]
    assert main(base + run) == 0                                  # the later --steps 2 wins
    assert main(["--resume", str(tmp / "run")]) == 0
    assert "resuming at step 1" in capsys.readouterr().out
