"""Lesson 10: GPT-2 assembled. The model against an independent PyTorch GPT-2, llm.c's file formats,
the parameter count, the activation table, generation, and the exercise checks against wrong answers."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.activations import activation_bytes
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import PARAMETER_NAMES, GPT2Config, num_parameters, parameter_shapes
from llmc_lessons.sampling import generate

SMALL = GPT2Config(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=2, num_heads=2, channels=16)


def _batch(config, B=3, T=7, seed=1):
    gen = np.random.default_rng(seed)
    idx = gen.integers(0, config.vocab_size, size=(B, T), dtype=np.int64)
    targets = gen.integers(0, config.vocab_size, size=(B, T), dtype=np.int64)
    idx[0, :3] = 5  # repeated tokens: the encoder's scatter-add must accumulate, not overwrite
    return idx, targets


def _kernels_available():
    try:
        from llmc_lessons.cuda import load_kernel  # noqa: F401
        from llmc_lessons.layers.block import block_forward_cuda  # noqa: F401
        return True
    except Exception:
        return False


PATHS = ["numpy", pytest.param("kernels", marks=pytest.mark.skipif(
    not _kernels_available(), reason="the CUDA interface (llmc_lessons.cuda) or the kernel launchers are missing"))]


def _close(name, got, expected, rtol=1e-4, atol_floor=1e-6):
    """|got - expected| <= rtol * max|expected| + atol_floor, everywhere (float32 tolerance, scaled to the tensor)."""
    got, expected = np.asarray(device.to_host(got), np.float64), np.asarray(device.to_host(expected), np.float64)
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    err = np.max(np.abs(got - expected)) if got.size else 0.0
    allowed = rtol * np.max(np.abs(expected), initial=0.0) + atol_floor
    assert err <= allowed, f"{name}: max abs error {err:.3g} > allowed {allowed:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The independent GPT-2 in PyTorch (llmc_lessons.torch_gpt2): plain modules, tanh GELU, tied lm_head.

try:
    import torch
    from llmc_lessons.torch_gpt2 import UNSTACKED, from_course as torch_twin, llmc_grads, llmc_params, write_debug_state
except ImportError:  # the comparison tests skip; everything else still runs
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed: this test compares with it")


# ---------------------------------------------------------------------------------------------------------
# Parameter layout, count and initialisation


def test_parameter_count_d12_from_shapes():
    d12 = GPT2Config.from_name("d12")
    assert d12 == GPT2Config()
    assert num_parameters(d12, padded=True) == 124_475_904     # what llm.c allocates and prints
    assert num_parameters(d12, padded=False) == 124_439_808    # GPT-2 124M
    assert tuple(parameter_shapes(d12)) == PARAMETER_NAMES
    tiny = GPT2Config.from_name("tiny")
    assert (tiny.num_layers, tiny.num_heads, tiny.channels, tiny.max_seq_len, tiny.vocab_size,
            tiny.padded_vocab_size) == (2, 4, 64, 64, 50257, 50304)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        GPT2Config(channels=10, num_heads=4)
    with pytest.raises(ValueError, match="padded_vocab_size"):
        GPT2Config(vocab_size=50, padded_vocab_size=40)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.from_name("d13")
    with pytest.raises(ValueError, match="backend"):
        GPT2(SMALL, backend="torch")


def test_one_contiguous_buffer_in_llmc_order():
    model = GPT2(SMALL, seed=0, backend="numpy")
    model.zero_grad()
    for memory, views in ((model.params_memory, model.params), (model.grads_memory, model.grads)):
        assert memory.dtype == np.float32 and memory.ndim == 1 and memory.size == model.num_parameters
        offset = 0
        for name, shape in parameter_shapes(SMALL).items():
            view = views[name]
            assert view.shape == shape and view.flags.c_contiguous
            assert np.shares_memory(view, memory)
            assert view.__array_interface__["data"][0] == memory.__array_interface__["data"][0] + 4 * offset, name
            offset += view.size
        assert offset == memory.size


def test_gpt2_initialisation():
    c = GPT2Config(max_seq_len=64, vocab_size=500, padded_vocab_size=512, num_layers=3, num_heads=4, channels=64)
    p = GPT2(c, seed=3, backend="numpy").params
    for name in ("wte", "wpe", "qkvw", "fcw"):
        values = p[name][:c.vocab_size] if name == "wte" else p[name]
        assert abs(values.std() - 0.02) < 0.002 and abs(values.mean()) < 0.002, name
    for name in ("attprojw", "fcprojw"):  # residual projections: 0.02 / sqrt(2 L)
        assert abs(p[name].std() - 0.02 / math.sqrt(2 * c.num_layers)) < 0.001, name
    assert not p["wte"][c.vocab_size:].any(), "the padded vocab rows of wte must be zero"
    for name in ("ln1w", "ln2w", "lnfw"):
        assert (p[name] == 1).all()
    for name in ("ln1b", "ln2b", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"):
        assert not p[name].any()
    again, other = GPT2(c, seed=3, backend="numpy"), GPT2(c, seed=4, backend="numpy")
    assert np.array_equal(again.params_memory, GPT2(c, seed=3, backend="numpy").params_memory)
    assert not np.array_equal(again.params_memory, other.params_memory)


# ---------------------------------------------------------------------------------------------------------
# Forward and backward against PyTorch


@needs_torch
@pytest.mark.parametrize("path", PATHS)
def test_logits_loss_and_every_gradient_match_pytorch(path):
    model = GPT2(SMALL, seed=0, backend="numpy")
    # Larger weights than the 0.02 init, so that every gradient is far from zero and errors show.
    gen = np.random.default_rng(7)
    model.params_memory[...] += gen.standard_normal(model.num_parameters).astype(np.float32) * 0.2
    model.params["wte"][SMALL.vocab_size:] = 0
    ref = torch_twin(model)
    model.use_kernels = path == "kernels"
    idx, targets = _batch(SMALL)
    loss = model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    logits, ref_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    ref_loss.backward()
    assert isinstance(loss, float)
    assert abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert model.logits.shape == (3, 7, SMALL.padded_vocab_size)
    _close("logits", device.to_host(model.logits)[..., :SMALL.vocab_size], logits.detach().numpy())
    expected = llmc_grads(ref)
    for name in PARAMETER_NAMES:
        _close("d" + name, model.grads[name], expected[name])
    assert not device.to_host(model.grads["wte"])[SMALL.vocab_size:].any()


@needs_torch
def test_the_padded_pytorch_model_is_the_unpadded_one_on_the_real_vocabulary():
    # the benchmark's strongest baseline pads the vocabulary to Vp: same logits, loss and gradients on the V
    # real tokens, padded logits that never reach the loss, padded rows of wte that get no gradient
    torch.manual_seed(0)
    model = GPT2(SMALL, seed=0, backend="numpy")
    model.params_memory[...] += np.random.default_rng(3).standard_normal(model.num_parameters).astype(np.float32) * 0.2
    model.params["wte"][SMALL.vocab_size:] = 0
    plain, padded = torch_twin(model), torch_twin(model, padded=True)
    assert padded.wte.weight.shape[0] == SMALL.padded_vocab_size > SMALL.vocab_size
    check_padded_twin(plain, padded, padded.wte, SMALL, PARAMETER_NAMES, *_batch(SMALL))


@needs_torch
def test_copying_weights_into_a_twin_of_another_shape_is_refused():
    """Only wte (and lm_head) give the twin their first rows; another tensor of another size is an error."""
    from dataclasses import replace
    from llmc_lessons.torch_gpt2 import TorchGPT2, copy_course_weights
    model = GPT2(SMALL, seed=0, backend="numpy")
    with pytest.raises(RuntimeError, match="split"):     # wpe (max_seq_len, C): a shorter twin's table
        copy_course_weights(TorchGPT2(replace(SMALL, max_seq_len=SMALL.max_seq_len - 1)), model)


def check_padded_twin(plain, padded, head, config, names, idx, targets):
    """A PyTorch twin with the vocabulary padded to Vp is the `plain` one on the V real tokens: the same logits, loss
    and gradients of `names`, padded logits that never reach the loss (`head`: the module that makes them), padded
    rows of wte and lm_head that get no gradient."""
    idx, targets = torch.from_numpy(idx), torch.from_numpy(targets)
    (logits, loss), (plogits, ploss) = plain(idx, targets), padded(idx, targets)
    assert plogits.shape[-1] == config.padded_vocab_size
    torch.testing.assert_close(plogits[..., :config.vocab_size], logits, rtol=0, atol=1e-6)
    assert abs(ploss.item() - loss.item()) <= 1e-6 * abs(loss.item())
    loss.backward()
    ploss.backward()
    want, got = llmc_grads(plain), llmc_grads(padded)
    for name in names:
        _close("d" + name, got[name], want[name])
    for name in {"wte", "lm_head"} & set(got):
        assert not got[name][config.vocab_size:].any(), f"the padded rows of {name} get no gradient"
    with torch.no_grad():                      # a padded column made huge changes nothing
        head.weight[-1] = 1e4
        assert padded(idx, targets)[1].item() == ploss.item()


def test_forward_without_targets_and_accumulating_grads():
    model = GPT2(SMALL, seed=1, backend="numpy")
    idx, targets = _batch(SMALL)
    assert model.forward(idx) is None and model.logits.shape == (3, 7, SMALL.padded_vocab_size)
    with pytest.raises(RuntimeError, match="with targets"):
        model.backward()
    model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    once = model.grads_memory.copy()
    model.backward()   # gradients accumulate, as in llm.c
    np.testing.assert_allclose(model.grads_memory, 2 * once, rtol=1e-6, atol=1e-9)
    model.zero_grad()
    assert not model.grads_memory.any()


def test_bad_input_is_refused_clearly():
    model = GPT2(SMALL, seed=0, backend="numpy")
    idx, targets = _batch(SMALL)
    with pytest.raises(TypeError, match="integer token ids"):
        model.forward(idx.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model.forward(idx[0])
    with pytest.raises(ValueError, match=r"token ids in \[0, 37\)"):
        model.forward(idx + SMALL.vocab_size)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(np.zeros((1, SMALL.max_seq_len + 1), np.int32))
    with pytest.raises(ValueError, match="shape of idx"):
        model.forward(idx, targets[:, :-1])
    with pytest.raises(RuntimeError, match="needs gradients"):
        model.update(1e-3)


def test_gradcheck_whole_model_float64():
    from llmc_lessons.gradcheck_gpt2 import gradcheck_gpt2
    report = gradcheck_gpt2(SMALL, B=2, T=5, checks_per_tensor=12).assert_ok()
    assert [r.name for r in report.rows] == list(PARAMETER_NAMES)
    assert all(r.max_abs > 0 or r.name == "wpe" for r in report.rows)


# ---------------------------------------------------------------------------------------------------------
# AdamW


@needs_torch
@pytest.mark.parametrize("path", PATHS)
def test_adamw_steps_match_torch_with_decay_groups(path):
    model = GPT2(SMALL, seed=2, backend="numpy")
    ref = torch_twin(model)
    model.use_kernels = path == "kernels"
    idx, targets = _batch(SMALL)
    model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    # The same gradients go into both optimizers: this test is about the update alone.
    ours = {name: device.to_host(g) for name, g in model.grads.items()}
    for name, tensors in ref.llmc_tensors().items():
        for l, t in enumerate(tensors):
            g = ours[name][:SMALL.vocab_size] if name == "wte" else ours[name] if name in UNSTACKED else ours[name][l]
            t.grad = torch.from_numpy(np.array(g))
    opt = torch.optim.AdamW(ref.decay_groups(0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in (1, 2):
        opt.step()
        model.update(3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        assert model.step == step
    for name, expected in llmc_params(ref).items():
        got = device.to_host(model.params[name])
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6, err_msg=name)  # padded wte rows stay 0


# ---------------------------------------------------------------------------------------------------------
# llm.c's files


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = GPT2(SMALL, seed=5, backend="numpy")
    path = tmp_path / "model.bin"
    model.save_llmc_checkpoint(path)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 4 * model.num_parameters
    header = np.frombuffer(raw[:1024], np.int32)
    assert list(header[:8]) == [20240326, 3, 16, 37, 2, 2, 16, 40] and not header[8:].any()
    loaded = GPT2.from_llmc_checkpoint(path, backend="numpy")
    assert loaded.config == SMALL
    assert loaded.params_memory.tobytes() == model.params_memory.tobytes()
    loaded.save_llmc_checkpoint(tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == raw


def test_checkpoint_errors_and_bf16(tmp_path):
    model = GPT2(SMALL, seed=5, backend="numpy")
    path = tmp_path / "model.bin"
    model.save_llmc_checkpoint(path)
    raw = bytearray(path.read_bytes())
    (tmp_path / "short.bin").write_bytes(bytes(raw[:-4]))
    with pytest.raises(ValueError, match="short.bin: the header describes .* but the file has"):
        GPT2.from_llmc_checkpoint(tmp_path / "short.bin")
    huge = np.frombuffer(bytes(raw[:1024]), np.int32).copy()
    huge[4] = 2**30                                   # L: 2^30 layers, terabytes, in a file of a few kB
    (tmp_path / "huge.bin").write_bytes(huge.tobytes() + bytes(raw[1024:]))
    with pytest.raises(ValueError, match="huge.bin: the header describes"):
        GPT2.from_llmc_checkpoint(tmp_path / "huge.bin")
    zero = huge.copy()
    zero[6] = 0                                       # C = 0
    (tmp_path / "zero.bin").write_bytes(zero.tobytes() + bytes(raw[1024:]))
    with pytest.raises(ValueError, match="zero.bin: the header's sizes are not a GPT-2 model"):
        GPT2.from_llmc_checkpoint(tmp_path / "zero.bin")
    bad = bytearray(raw)
    bad[:4] = np.int32(123).tobytes()
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad magic"):
        GPT2.from_llmc_checkpoint(tmp_path / "bad.bin")
    # version 5: the same tensors in bfloat16 (the upper 16 bits of each float32)
    header = np.frombuffer(bytes(raw[:1024]), np.int32).copy()
    header[1] = 5
    bf16 = (model.params_memory.view(np.uint32) >> 16).astype(np.uint16)
    (tmp_path / "bf16.bin").write_bytes(header.tobytes() + bf16.tobytes())
    loaded = GPT2.from_llmc_checkpoint(tmp_path / "bf16.bin", backend="numpy")
    truncated = (model.params_memory.view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert np.array_equal(loaded.params_memory, truncated)


def _verify(model_path, state_path, *extra):
    from llmc_lessons import verify
    return verify.main([str(model_path), str(state_path), "--backend", "numpy", *extra])


def test_verify_passes_on_own_state_and_fails_on_a_wrong_one(tmp_path, capsys):
    from llmc_lessons.verify import read_debug_state, write_debug_state
    model = GPT2(SMALL, seed=6, backend="numpy")
    model.save_llmc_checkpoint(tmp_path / "model.bin")
    idx, targets = _batch(SMALL)
    loss = write_debug_state(tmp_path / "state.bin", model, idx, targets)
    state = read_debug_state(tmp_path / "state.bin", SMALL)
    assert state["B"] == 3 and state["T"] == 7 and np.array_equal(state["x"], idx)
    assert state["logits"].shape == (3, 7, SMALL.vocab_size) and state["loss"] == np.float32(loss)
    assert _verify(tmp_path / "model.bin", tmp_path / "state.bin") == 0
    out = capsys.readouterr().out
    assert "overall okay: 1" in out and out.count(" OK") == 18   # logits, loss, 16 gradients
    # A gradient off by 1% of its scale must fail, naming the tensor.
    raw = bytearray((tmp_path / "state.bin").read_bytes())
    grads = np.frombuffer(raw, np.float32, offset=len(raw) - 4 * model.num_parameters).copy()
    qkvw = state["grads"]["qkvw"]
    start = sum(math.prod(s) for s in list(parameter_shapes(SMALL).values())[:4])
    grads[start + 5] += 0.01 * np.abs(qkvw).max()
    (tmp_path / "wrong.bin").write_bytes(bytes(raw[:len(raw) - 4 * model.num_parameters]) + grads.tobytes())
    assert _verify(tmp_path / "model.bin", tmp_path / "wrong.bin") == 1
    out = capsys.readouterr().out
    assert "overall okay: 0" in out
    assert [line.split()[0] for line in out.splitlines() if line.endswith("NOT OK")] == ["dqkvw"]
    # llm.c's own (absolute) tolerances are loose for a tiny model: the same error passes them.
    assert _verify(tmp_path / "model.bin", tmp_path / "wrong.bin", "--llmc-tolerances") == 0


def test_verify_rejects_a_state_of_another_model(tmp_path):
    from llmc_lessons.verify import read_debug_state, write_debug_state
    model = GPT2(SMALL, seed=6, backend="numpy")
    idx, targets = _batch(SMALL)
    write_debug_state(tmp_path / "state.bin", model, idx, targets)
    bigger = GPT2Config(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=3, num_heads=2, channels=16)
    with pytest.raises(ValueError, match="ends inside the gradients"):
        read_debug_state(tmp_path / "state.bin", bigger)


@needs_torch
def test_verify_cli_on_a_state_written_by_pytorch(tmp_path):
    model = GPT2(SMALL, seed=8, backend="numpy")
    model.params_memory[...] += np.random.default_rng(1).standard_normal(model.num_parameters).astype(np.float32) * 0.1
    model.params["wte"][SMALL.vocab_size:] = 0
    model.save_llmc_checkpoint(tmp_path / "model.bin")
    idx, targets = _batch(SMALL)
    write_debug_state(tmp_path / "state.bin", torch_twin(model), idx, targets)
    run = subprocess.run([sys.executable, "-m", "llmc_lessons.verify", str(tmp_path / "model.bin"),
                          str(tmp_path / "state.bin"), "--backend", "numpy"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "overall okay: 1" in run.stdout


# ---------------------------------------------------------------------------------------------------------
# Activation memory


def test_activation_table_follows_llmc_and_matches_what_the_model_holds():
    names = ["encoded", "ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "preatt", "att", "attproj", "residual2",
             "ln2", "ln2_mean", "ln2_rstd", "fch", "fch_gelu", "fcproj", "residual3", "lnf", "lnf_mean",
             "lnf_rstd", "logits", "probs", "losses"]
    d12 = GPT2Config.from_name("d12")
    rows = activation_bytes(d12, 4, 64)
    assert [r.name for r in rows] == names
    # llm.c's num_activations for B=4, T=64 (fill_in_activation_sizes), in float32 bytes
    L, C, NH, Vp, BT = 12, 768, 12, 50304, 4 * 64
    llmc_floats = (BT * C + L * BT * 18 * C + L * BT * 4 + 2 * L * 4 * NH * 64 * 64
                   + BT * C + 2 * BT + 2 * BT * Vp + BT)
    assert sum(r.bytes for r in rows) == 4 * llmc_floats
    model = GPT2(SMALL, seed=0, backend="numpy")
    model.forward(*_batch(SMALL))
    from llmc_lessons.activations import held_activation_bytes
    course = sum(r.course_bytes for r in activation_bytes(SMALL, 3, 7))
    assert held_activation_bytes(model) == course


# ---------------------------------------------------------------------------------------------------------
# Generation


def test_generate_is_seeded_and_respects_temperature_and_top_k():
    model = GPT2(SMALL, seed=0, backend="numpy")
    model.params_memory[...] += np.random.default_rng(2).standard_normal(model.num_parameters).astype(np.float32)
    prompt = [3, 1, 4]
    a = generate(model, prompt, 20, seed=1)
    assert a[:3] == prompt and len(a) == 23 and all(0 <= t < SMALL.vocab_size for t in a)
    assert a == generate(model, prompt, 20, seed=1) != generate(model, prompt, 20, seed=2)
    greedy = generate(model, prompt, 6, temperature=0)
    assert generate(model, prompt, 6, top_k=1, seed=5) == greedy
    model.forward(np.array([greedy[:-1]]))
    assert int(np.argmax(model.logits[0, -1, :SMALL.vocab_size])) == greedy[-1]
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)


def test_next_token_probs():
    from llmc_lessons.sampling import next_token_probs
    logits = np.array([1.0, 3.0, 2.0, 0.5, 100.0])   # the last column is padding (V = 4)
    p = next_token_probs(logits, 4)
    assert p.shape == (4,) and abs(p.sum() - 1) < 1e-12 and np.argmax(p) == 1
    top2 = next_token_probs(logits, 4, temperature=0.5, top_k=2)
    e = np.exp(np.array([3.0, 2.0]) / 0.5)
    np.testing.assert_allclose(top2, [0, e[0] / e.sum(), e[1] / e.sum(), 0])


# ---------------------------------------------------------------------------------------------------------
# The exercise checks: pass on the answer, fail on the stub and on plausible mistakes


def _fails(check, fn, *fragments):
    with pytest.raises(AssertionError) as info:
        check(fn)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def _stub(*args, **kwargs):
    raise NotImplementedError("Exercise 10.k: write it")


def test_check_parameter_count():
    from llmc_lessons.checks.model import check_parameter_count

    def answer(c, padded):
        C, L = c.channels, c.num_layers
        rows = c.padded_vocab_size if padded else c.vocab_size
        return rows * C + c.max_seq_len * C + L * (12 * C * C + 13 * C) + 2 * C

    check_parameter_count(answer)
    check_parameter_count(lambda c, padded: num_parameters(c, padded))
    _fails(check_parameter_count, _stub, "Exercise 10.1 is not done yet")
    _fails(check_parameter_count, lambda c, p: answer(c, p) + c.vocab_size * c.channels, "lm_head")
    _fails(check_parameter_count, lambda c, p: answer(c, not p), "padded and unpadded swapped")
    _fails(check_parameter_count, lambda c, p: answer(c, p) - c.num_layers * 9 * c.channels, "biases are missing")
    _fails(check_parameter_count, lambda c, p: answer(c, p) - 2 * c.channels, "final layernorm")
    _fails(check_parameter_count, lambda c, p: answer(c, p) - c.max_seq_len * c.channels, "wpe")
    _fails(check_parameter_count, lambda c, p: float(answer(c, p)), "return an int")
    _fails(check_parameter_count, lambda c, p: 124_439_808 if not p else 124_475_904, "expected")


def test_check_wte_gradient():
    from llmc_lessons.checks.model import check_wte_gradient

    def head(dlogits, lnf):
        return dlogits.reshape(-1, dlogits.shape[-1]).T @ lnf.reshape(-1, lnf.shape[-1])

    def answer(dlogits, lnf, dencoded, idx):
        dwte = head(dlogits, lnf)
        np.add.at(dwte, idx.reshape(-1), dencoded.reshape(-1, dencoded.shape[-1]))
        return dwte

    def overwrite(dlogits, lnf, dencoded, idx):
        dwte = head(dlogits, lnf)
        dwte[idx.reshape(-1)] += dencoded.reshape(-1, dencoded.shape[-1])
        return dwte

    def encoder_only(dlogits, lnf, dencoded, idx):
        return answer(dlogits, lnf, dencoded, idx) - head(dlogits, lnf)

    check_wte_gradient(answer)
    _fails(check_wte_gradient, _stub, "Exercise 10.2 is not done yet")
    _fails(check_wte_gradient, lambda d, l, e, i: head(d, l), "only the lm_head's share")
    _fails(check_wte_gradient, encoder_only, "only the encoder's share")
    _fails(check_wte_gradient, overwrite, "np.add.at")
    _fails(check_wte_gradient, lambda d, l, e, i: head(d, l).T, "expected shape")
    _fails(check_wte_gradient, lambda d, l, e, i: answer(d, l, e, i) - 2 * head(d, l), "wrong sign")
    _fails(check_wte_gradient, lambda d, l, e, i: None, "return")


def test_check_next_token_probs():
    from llmc_lessons.checks.model import check_next_token_probs
    from llmc_lessons.sampling import next_token_probs

    def answer(logits, V, temperature, top_k):
        z = logits[:V].astype(np.float64) / temperature
        if top_k is not None:
            z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
        p = np.exp(z - z.max())
        return p / p.sum()

    def times_t(logits, V, t, k):
        return answer(logits * t * t, V, t, k)

    def k_plus_one(logits, V, t, k):
        return answer(logits, V, t, None if k is None else min(k + 1, V))

    def unnormalised(logits, V, t, k):
        p = answer(logits, V, t, None)
        return p if k is None else np.where(answer(logits, V, t, k) > 0, p, 0)

    def with_padding(logits, V, t, k):
        return answer(logits, len(logits), t, k)[:V]

    check_next_token_probs(answer)
    check_next_token_probs(next_token_probs)
    _fails(check_next_token_probs, _stub, "Exercise 10.3 is not done yet")
    _fails(check_next_token_probs, times_t, "temperature multiplies")
    _fails(check_next_token_probs, k_plus_one, "k+1")
    _fails(check_next_token_probs, unnormalised, "not renormalised")
    _fails(check_next_token_probs, with_padding, "padd")
    _fails(check_next_token_probs, lambda l, V, t, k: answer(l, len(l), t, k), "padding")


# ---------------------------------------------------------------------------------------------------------
# The two paths, switching between them, and the optimizer's flat runs


@pytest.mark.parametrize("path", PATHS)
def test_held_activations_match_the_table_on_both_paths(path):
    from llmc_lessons.activations import held_activation_bytes
    model = GPT2(SMALL, seed=0, backend=path)
    model.forward(*_batch(SMALL))
    assert held_activation_bytes(model) == sum(r.course_bytes for r in activation_bytes(SMALL, 3, 7))


@pytest.mark.skipif(not _kernels_available(), reason="the CUDA interface or the kernel launchers are missing")
def test_switching_paths_keeps_the_weights_and_agrees():
    model = GPT2(SMALL, seed=4, backend="numpy")
    idx, targets = _batch(SMALL)
    results = []
    for use_kernels in (False, True, False):
        model.use_kernels = use_kernels
        assert model.xp is (device.xp if use_kernels else np)
        loss = model.forward(idx, targets)
        model.zero_grad()
        model.backward()
        results.append((loss, device.to_host(model.logits).copy(), device.to_host(model.grads_memory).copy()))
    (l0, lg0, g0), (l1, lg1, g1), (l2, lg2, g2) = results
    assert l0 == l2 and np.array_equal(lg0, lg2) and np.array_equal(g0, g2)
    assert abs(l0 - l1) < 1e-5
    _close("logits", lg1, lg0, rtol=1e-5)
    _close("grads", g1, g0, rtol=1e-5)


def test_decay_runs_cover_the_buffer_and_grad_scale():
    from llmc_lessons.parameters import decay_runs
    runs = decay_runs(SMALL)
    assert len(runs) == 10 and runs[0][0] == 0 and runs[-1][1] == num_parameters(SMALL)
    assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(runs, runs[1:]))
    a, b = GPT2(SMALL, seed=9, backend="numpy"), GPT2(SMALL, seed=9, backend="numpy")
    idx, targets = _batch(SMALL)
    for m in (a, b):
        m.forward(idx, targets)
        m.zero_grad()
        m.backward()
    b.grads_memory *= np.float32(0.25)
    a.update(1e-3, weight_decay=0.1, grad_scale=0.25)
    b.update(1e-3, weight_decay=0.1)
    np.testing.assert_allclose(a.params_memory, b.params_memory, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="counts AdamW steps from 1"):
        a.update(1e-3, t=0)


def test_keep_logits_false_skips_the_copy_and_changes_nothing_else():
    kept, dropped = GPT2(SMALL, seed=4, backend="kernels"), GPT2(SMALL, seed=4, backend="kernels")
    dropped.keep_logits = False
    idx, targets = _batch(SMALL)
    for m in (kept, dropped):
        m.forward(idx, targets)
        m.zero_grad()
        m.backward()
    assert dropped.logits is None and kept.logits is not None
    assert kept.mean_loss == dropped.mean_loss
    np.testing.assert_array_equal(device.to_host(kept.grads_memory), device.to_host(dropped.grads_memory))
