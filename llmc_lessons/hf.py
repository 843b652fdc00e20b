"""OpenAI's GPT-2 weights as Hugging Face publishes them <-> llm.c's model file, with NumPy only (no PyTorch).

A Hugging Face GPT-2 checkpoint is a folder with `config.json` (n_layer, n_head, n_embd, n_positions, vocab_size)
and `model.safetensors` (named tensors). It differs from llm.c's layout in three ways:
  * names: `h.{l}.attn.c_attn.weight` is llm.c's qkvw[l], and so on (HF_NAMES below), sometimes prefixed by
    `transformer.`; each layer also stores `attn.bias` and `attn.masked_bias`, the causal mask as a buffer, which
    carry no weights and are skipped;
  * GPT-2's linear layers are `Conv1D` modules, whose weight is stored (in, out); llm.c stores (out, in), so
    every matrix is transposed on the way;
  * the vocabulary is not padded: wte has V rows, and llm.c's padded rows V..Vp-1 are zeros.
The output layer (lm_head) shares wte in both formats, so a file that stores a different lm_head is refused.

Command line (nothing downloads; fetch the folder first, README.md says how):
  python -m llmc_lessons.hf to-llmc FOLDER OUT.bin      Hugging Face folder -> llm.c model file (version 3, fp32)
  python -m llmc_lessons.hf from-llmc IN.bin FOLDER     llm.c model file -> Hugging Face folder
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from llmc_lessons import device
from llmc_lessons.files import atomic_write
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import GPT2Config, parameter_shapes

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

HF_NAMES = {
    "wte": "wte.weight", "wpe": "wpe.weight",
    "ln1w": "h.{l}.ln_1.weight", "ln1b": "h.{l}.ln_1.bias",
    "qkvw": "h.{l}.attn.c_attn.weight", "qkvb": "h.{l}.attn.c_attn.bias",
    "attprojw": "h.{l}.attn.c_proj.weight", "attprojb": "h.{l}.attn.c_proj.bias",
    "ln2w": "h.{l}.ln_2.weight", "ln2b": "h.{l}.ln_2.bias",
    "fcw": "h.{l}.mlp.c_fc.weight", "fcb": "h.{l}.mlp.c_fc.bias",
    "fcprojw": "h.{l}.mlp.c_proj.weight", "fcprojb": "h.{l}.mlp.c_proj.bias",
    "lnfw": "ln_f.weight", "lnfb": "ln_f.bias",
}
"""llm.c's name -> the Hugging Face name ({l} is the layer)."""
CONV1D = ("qkvw", "attprojw", "fcw", "fcprojw")
"""The matrices that Hugging Face stores (in, out) as Conv1D weights; llm.c stores them (out, in)."""
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def padded_vocab_size(V: int) -> int:
    """Vp: V rounded up to a multiple of 128, as llm.c's train_gpt2.py pads it (50257 -> 50304)."""
    return -(-V // 128) * 128


# --- config.json ---------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, where: str = CONFIG_FILE) -> GPT2Config:
    """GPT2Config from a Hugging Face GPT-2 config.json; refuses the variants llm.c's model does not compute."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf['model_type']!r}; only GPT-2 ('gpt2') converts")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing or ("n_positions" not in hf and "n_ctx" not in hf):
        raise ValueError(f"{where}: missing {missing or ['n_positions']}: not a GPT-2 config.json")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "llm.c's GELU is the tanh approximation ('gelu_new')"),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "llm.c's layernorm uses 1e-5"),
        "n_inner": (hf.get("n_inner") in (None, 4 * hf["n_embd"]), "llm.c's MLP is 4 * n_embd wide"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "llm.c scales attention by 1/sqrt(hs)"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False),
                                            "llm.c does not scale attention by layer"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is True, "llm.c's lm_head is wte"),
        "add_cross_attention": (not hf.get("add_cross_attention", False), "llm.c's GPT-2 has no cross-attention"),
    }
    for key, (ok, why) in unsupported.items():
        if not ok:
            raise ValueError(f"{where}: {key} = {hf[key]!r} is not supported: {why}")
    V = int(hf["vocab_size"])
    return GPT2Config(max_seq_len=int(hf.get("n_positions", hf.get("n_ctx"))), vocab_size=V,
                      padded_vocab_size=padded_vocab_size(V), num_layers=int(hf["n_layer"]),
                      num_heads=int(hf["n_head"]), channels=int(hf["n_embd"]))


def config_to_hf(config: GPT2Config) -> dict:
    """The config.json of a Hugging Face GPT-2 with this shape (no dropout: llm.c trains without it)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": config.num_layers, "n_head": config.num_heads, "n_embd": config.channels,
            "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len, "vocab_size": config.vocab_size,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "resid_pdrop": 0.0, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}


# --- tensors -------------------------------------------------------------------------------------------------

def _check_shape(where: str, name: str, a: np.ndarray, want: tuple) -> None:
    if tuple(a.shape) != tuple(want):
        raise ValueError(f"{where}: {name} must have shape {tuple(want)}, got {tuple(a.shape)}")


def hf_to_llmc(tensors: dict, config: GPT2Config, where: str = WEIGHTS_FILE) -> dict:
    """{Hugging Face name: array} -> llm.c's 16 float32 tensors {name: array of parameter_shapes(config)[name]}."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    V, L = config.vocab_size, config.num_layers
    used = set()

    def get(key, want):
        if key not in tensors:
            raise ValueError(f"{where}: tensor {key!r} is missing (is this a GPT-2 checkpoint with "
                             f"{L} layers?)")
        used.add(key)
        a = np.asarray(tensors[key])
        _check_shape(where, key, a, want)
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{where}: {key} must hold floating-point numbers, got dtype {a.dtype}")
        return a.astype(np.float32)

    out = {}
    for name, shape in parameter_shapes(config).items():
        if name == "wte":
            out[name] = np.zeros(shape, np.float32)
            out[name][:V] = get(HF_NAMES[name], (V, shape[1]))
        elif name in ("wpe", "lnfw", "lnfb"):
            out[name] = get(HF_NAMES[name], shape)
        else:
            per_layer = shape[1:][::-1] if name in CONV1D else shape[1:]
            layers = [get(HF_NAMES[name].format(l=l), per_layer) for l in range(L)]
            out[name] = np.stack([a.T if name in CONV1D else a for a in layers])
    if "lm_head.weight" in tensors:
        used.add("lm_head.weight")
        head = np.asarray(tensors["lm_head.weight"])
        _check_shape(where, "lm_head.weight", head, (V, config.channels))
        if not np.array_equal(head.astype(np.float32), out["wte"][:V]):
            raise ValueError(f"{where}: lm_head.weight differs from wte.weight; llm.c's GPT-2 ties them, so this "
                             f"checkpoint cannot be converted")
    extra = sorted(k for k in tensors if k not in used and not k.endswith(_BUFFERS))
    if extra:
        raise ValueError(f"{where}: tensors llm.c's GPT-2 has no place for: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''} (layers beyond n_layer = {L}?)")
    return out


def llmc_to_hf(params: dict, config: GPT2Config) -> dict:
    """llm.c's 16 tensors -> {Hugging Face name: float32 array}: Conv1D matrices transposed, wte unpadded."""
    shapes = parameter_shapes(config)
    out = {}
    for name, a in params.items():
        a = np.asarray(device.to_host(a), dtype=np.float32)
        _check_shape("llm.c parameters", name, a, shapes[name])
        if name == "wte":
            out[HF_NAMES[name]] = np.ascontiguousarray(a[:config.vocab_size])
        elif name in ("wpe", "lnfw", "lnfb"):
            out[HF_NAMES[name]] = np.ascontiguousarray(a)
        else:
            for l in range(config.num_layers):
                out[HF_NAMES[name].format(l=l)] = np.ascontiguousarray(a[l].T if name in CONV1D else a[l])
    return out


# --- files ---------------------------------------------------------------------------------------------------

def load_hf(folder: str | Path, backend: str | None = None, precision: str = "fp32") -> GPT2:
    """A GPT2 with the weights of a Hugging Face GPT-2 folder (config.json + model.safetensors)."""
    from safetensors import safe_open
    folder = Path(folder)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing: a Hugging Face GPT-2 folder holds {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE} (README.md says how to fetch them)")
    try:
        hf = json.loads((folder / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: not valid JSON ({e})") from None
    config = config_from_hf(hf, str(folder / CONFIG_FILE))
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(_BUFFERS)}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a damaged file)
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"{folder / WEIGHTS_FILE}: cannot read it as safetensors ({why}); NumPy reads float32 "
                         f"and float16 tensors, not bfloat16") from None
    params = hf_to_llmc(tensors, config, str(folder / WEIGHTS_FILE))
    model = GPT2(config, seed=None, backend=backend, precision=precision)
    for name, a in params.items():
        model.params[name][...] = model.xp.asarray(a)
    model.sync_params()
    return model


def save_hf(model: GPT2, folder: str | Path) -> Path:
    """Write config.json and model.safetensors (float32) into `folder`, each file atomically."""
    from safetensors.numpy import save
    folder = Path(folder)
    tensors = llmc_to_hf(model.params, model.config)
    atomic_write(folder / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_FILE, (json.dumps(config_to_hf(model.config), indent=2) + "\n").encode())
    return folder


def load_weights(path: str | Path, backend: str | None = None, precision: str = "fp32") -> GPT2:
    """A GPT2 from an llm.c model file (.bin) or a Hugging Face GPT-2 folder."""
    path = Path(path)
    if path.is_dir():
        return load_hf(path, backend=backend, precision=precision)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such llm.c model file or Hugging Face folder")
    return GPT2.from_llmc_checkpoint(path, backend=backend, precision=precision)


# --- command line --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m llmc_lessons.hf", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    to = sub.add_parser("to-llmc", help="Hugging Face GPT-2 folder -> llm.c model file")
    to.add_argument("folder")
    to.add_argument("out")
    back = sub.add_parser("from-llmc", help="llm.c model file -> Hugging Face GPT-2 folder")
    back.add_argument("bin")
    back.add_argument("folder")
    for s in (to, back):
        s.add_argument("--overwrite", action="store_true", help="replace files that exist already")
    args = p.parse_args(argv)
    targets = [Path(args.out)] if args.cmd == "to-llmc" else [Path(args.folder) / CONFIG_FILE,
                                                              Path(args.folder) / WEIGHTS_FILE]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        print(f"error: {', '.join(existing)} exists already; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        if args.cmd == "to-llmc":
            model = load_hf(args.folder, backend="numpy")
            model.save_llmc_checkpoint(args.out)
        else:
            model = GPT2.from_llmc_checkpoint(args.bin, backend="numpy")
            save_hf(model, args.folder)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{model!r}\nwrote {', '.join(map(str, targets))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
