"""Lesson 16: the LLaMA-style model. Its layout, RoPE + grouped-query attention and the whole model checked in
float64, the model against an independent PyTorch LLaMA (logits, loss, every gradient, AdamW steps), its
checkpoint files, and generation with a key/value cache against full recomputation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.device import to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.attention import attention_backward, attention_forward
from llmc_lessons.layers.rope import precompute_freqs_cis
from llmc_lessons.llama import (LLAMA_BLOCK_PARAMETER_NAMES, LLAMA_PARAMETER_NAMES, KVCache, Llama, LlamaConfig,
                                forward_cached, generate_cached, llama_backward, llama_decay_runs, llama_forward,
                                llama_num_parameters, llama_parameter_shapes, rope_qkv_backward, rope_qkv_forward)
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.parameters import num_parameters
from llmc_lessons.sampling import generate

SMALL = LlamaConfig(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                    channels=16, ffn_hidden=12)

from test_model import check_padded_twin   # outside the try: an error there is not "PyTorch is missing"

try:
    import torch
    from llmc_lessons.torch_llama import from_course as torch_twin, llmc_grads, llmc_params
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed: this test compares with it")


def _batch(config, B=3, T=7, seed=1):
    gen = np.random.default_rng(seed)
    idx = gen.integers(0, config.vocab_size, size=(B, T), dtype=np.int64)
    idx[0, :3] = 5  # a repeated token: its embedding gradient must collect every position
    return idx, gen.integers(0, config.vocab_size, size=(B, T), dtype=np.int64)


def _perturbed(config, seed=0):
    """A model with weights far from the init, so that every gradient is far from zero and errors show."""
    model = Llama(config, seed=seed, backend="numpy")
    model.params_memory[...] += np.random.default_rng(7).standard_normal(model.num_parameters).astype(np.float32) * 0.2
    model.params["wte"][config.vocab_size:] = 0
    model.params["lm_head"][config.vocab_size:] = 0
    return model


def _close(name, got, expected, rtol=1e-4, atol_floor=1e-6):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    err = np.max(np.abs(got - expected)) if got.size else 0.0
    allowed = rtol * np.max(np.abs(expected), initial=0.0) + atol_floor
    assert err <= allowed, f"{name}: max abs error {err:.3g} > allowed {allowed:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Config and layout


def test_presets_and_the_124m_parameter_count():
    c = LlamaConfig.from_name("llama-124m")
    gpt2 = num_parameters(GPT2Config.from_name("d12"), padded=False)
    assert llama_num_parameters(c, padded=False) == 124_399_872
    assert abs(llama_num_parameters(c, padded=False) - gpt2) / gpt2 < 1e-3
    assert (c.num_layers, c.num_heads, c.channels) == (12, 12, 768)
    tiny = LlamaConfig.from_name("llama-tiny")
    assert (tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.channels, tiny.max_seq_len) == (2, 4, 2, 64, 64)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="must divide num_heads"):
        LlamaConfig(num_heads=12, num_kv_heads=5)
    with pytest.raises(ValueError, match="even head size"):
        LlamaConfig(channels=36, num_heads=12, num_kv_heads=4)
    with pytest.raises(ValueError, match="rope_theta"):
        LlamaConfig(rope_theta=-1.0)
    with pytest.raises(ValueError, match="unknown LLaMA-style preset"):
        LlamaConfig.from_name("llama-7b")
    with pytest.raises(TypeError, match="LlamaConfig"):
        Llama(GPT2Config.from_name("tiny"))
    with pytest.raises(TypeError, match="GPT2Config"):
        GPT2(SMALL)
    with pytest.raises(ValueError, match="head size"):
        Llama(LlamaConfig(num_heads=4, num_kv_heads=2, channels=40, ffn_hidden=16), precision="bf16")
    with pytest.raises(ValueError, match="H \\(12\\) must be a multiple of 8"):
        Llama(LlamaConfig(num_heads=4, num_kv_heads=2, channels=64, ffn_hidden=12), precision="bf16")
    with pytest.raises(ValueError, match="C \\(2112\\) must be at most 2048"):   # the fused RMSNorm kernels' rows
        Llama(LlamaConfig(num_heads=33, num_kv_heads=11, channels=2112, ffn_hidden=16), precision="bf16")


def test_one_flat_buffer_in_the_order_the_data_moves():
    model = Llama(SMALL, seed=0, backend="numpy")
    model.zero_grad()
    assert tuple(model.params) == LLAMA_PARAMETER_NAMES == tuple(llama_parameter_shapes(SMALL))
    assert model.num_parameters == llama_num_parameters(SMALL) == model.params_memory.size
    offset = 0
    for name, shape in llama_parameter_shapes(SMALL).items():
        for views, memory in ((model.params, model.params_memory), (model.grads, model.grads_memory)):
            assert views[name].shape == shape and np.shares_memory(views[name], memory)
        offset += math.prod(shape)
    assert offset == model.num_parameters
    assert model.layer_params(1)["qkvw"].shape == ((4 + 2 * 2) * 4, 16)
    # AdamW's runs: wte decays, ln1w does not, ... lnfw does not, lm_head does
    runs = llama_decay_runs(SMALL)
    assert [d for _, _, d in runs] == [True, False, True, False, True, False, True]
    assert runs[-1][1] == model.num_parameters


def test_initialisation():
    c = LlamaConfig(max_seq_len=16, vocab_size=500, padded_vocab_size=512, num_layers=3, num_heads=4,
                    num_kv_heads=2, channels=64, ffn_hidden=96)
    p = Llama(c, seed=3, backend="numpy").params
    for name in ("wte", "lm_head", "qkvw", "fcw"):
        values = p[name][:c.vocab_size] if name in ("wte", "lm_head") else p[name]
        assert abs(values.std() - 0.02) < 0.002, name
    for name in ("attprojw", "fcprojw"):
        assert abs(p[name].std() - 0.02 / math.sqrt(6)) < 0.001, name
    for name in ("ln1w", "ln2w", "lnfw"):
        assert (p[name] == 1).all()
    assert not p["wte"][c.vocab_size:].any() and not p["lm_head"][c.vocab_size:].any()
    assert not np.shares_memory(p["wte"], p["lm_head"]) and not np.array_equal(p["wte"], p["lm_head"])


# ---------------------------------------------------------------------------------------------------------
# Float64 gradient checks: RoPE composed with grouped-query attention, then the whole model


@pytest.mark.parametrize("NH,NKV", [(4, 2), (4, 1), (2, 2)])
def test_rope_then_gqa_gradcheck(NH, NKV):
    B, T, hs = 2, 5, 4
    qkv = np.random.default_rng(2).standard_normal((B, T, (NH + 2 * NKV) * hs))
    freqs_cis = precompute_freqs_cis(hs, T, dtype=np.float64)

    def forward(qkv):
        return attention_forward(rope_qkv_forward(qkv, freqs_cis, NH, NKV), NH, NKV)[0]

    def backward(dout, qkv):
        qkvr = rope_qkv_forward(qkv, freqs_cis, NH, NKV)
        dqkvr = attention_backward(dout, qkvr, attention_forward(qkvr, NH, NKV)[1], NH, NKV)
        return {"qkv": rope_qkv_backward(dqkvr, freqs_cis, NH, NKV)}

    gradcheck(forward, backward, {"qkv": qkv}, title="RoPE + grouped-query attention").assert_ok()


def test_rope_makes_attention_scores_depend_on_relative_position():
    NH = NKV = 1
    hs, T = 4, 6
    gen = np.random.default_rng(4)
    q, k = gen.standard_normal(hs), gen.standard_normal(hs)
    qkv = np.tile(np.concatenate([q, k, np.zeros(hs)]), (1, T, 1))          # the same q and k at every position
    qkvr = rope_qkv_forward(qkv, precompute_freqs_cis(hs, T, dtype=np.float64), NH, NKV)[0]
    scores = qkvr[:, :hs] @ qkvr[:, hs:2 * hs].T                             # (T, T)
    for offset in range(T):
        np.testing.assert_allclose(np.diag(scores, -offset), scores[offset, 0], atol=1e-12)


def test_whole_model_gradcheck_float64():
    c = LlamaConfig(max_seq_len=8, vocab_size=11, padded_vocab_size=12, num_layers=2, num_heads=4, num_kv_heads=2,
                    channels=8, ffn_hidden=6)
    model = _perturbed(c, seed=1)
    params64 = {name: np.array(p, dtype=np.float64) for name, p in model.params.items()}
    idx, targets = _batch(c, B=2, T=5)

    def forward(**p):
        return llama_forward(p, c, idx, targets)[1].mean()

    def backward(dloss, **p):
        return {name: g * dloss for name, g in llama_backward(p, c, llama_forward(p, c, idx, targets)[2]).items()}

    gradcheck(forward, backward, params64, title="LLaMA-style model", max_checks=40).assert_ok()


# ---------------------------------------------------------------------------------------------------------
# Against PyTorch


PATHS = ["numpy", "kernels"]


@needs_torch
@pytest.mark.parametrize("path", PATHS)
def test_logits_loss_and_every_gradient_match_pytorch(path):
    model = _perturbed(SMALL)
    ref = torch_twin(model)
    model.use_kernels = path == "kernels"
    idx, targets = _batch(SMALL)
    loss = model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    logits, ref_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    _close("logits", to_host(model.logits)[..., :SMALL.vocab_size], logits.detach().numpy())
    expected = llmc_grads(ref)
    grads = {name: to_host(g) for name, g in model.grads.items()}
    for name in LLAMA_PARAMETER_NAMES:
        _close("d" + name, grads[name], expected[name])
    assert not grads["wte"][SMALL.vocab_size:].any() and not grads["lm_head"][SMALL.vocab_size:].any()


@needs_torch
def test_flash_reference_agrees_with_the_plain_one():
    model = _perturbed(SMALL)
    idx, targets = _batch(SMALL)
    plain, flash = torch_twin(model), torch_twin(model, flash=True)
    np.testing.assert_allclose(plain(torch.from_numpy(idx))[0].detach().numpy(),
                               flash(torch.from_numpy(idx))[0].detach().numpy(), atol=2e-5)


@needs_torch
def test_the_padded_pytorch_model_is_the_unpadded_one_on_the_real_vocabulary():
    # the benchmark's strongest baseline pads the vocabulary to Vp, as for GPT-2: same logits, loss and gradients on
    # the V real tokens; the padded rows of tok_embeddings and output get no gradient
    model = _perturbed(SMALL)
    plain, padded = torch_twin(model), torch_twin(model, padded=True)
    assert padded.tok_embeddings.weight.shape[0] == padded.output.weight.shape[0] == SMALL.padded_vocab_size
    check_padded_twin(plain, padded, padded.output, SMALL, LLAMA_PARAMETER_NAMES, *_batch(SMALL))
    repadded = llmc_params(torch_twin(model, padded=True))       # the course's layout, whichever the twin
    assert all(np.array_equal(a, repadded[name]) for name, a in llmc_params(plain).items())


@needs_torch
@pytest.mark.parametrize("path", PATHS)
def test_training_steps_match_pytorch_adamw(path):
    model = Llama(SMALL, seed=2, backend=path)
    ref = torch_twin(model)
    opt = torch.optim.AdamW(ref.decay_groups(0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        idx, targets = _batch(SMALL, seed=step)
        loss = model.forward(idx, targets)
        model.zero_grad()
        model.backward()
        model.update(3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        opt.zero_grad()
        _, ref_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
        ref_loss.backward()
        opt.step()
        assert abs(loss - ref_loss.item()) < 1e-5, step
    for name, expected in llmc_params(ref).items():
        np.testing.assert_allclose(to_host(model.params[name]), expected, rtol=0, atol=2e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint files


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = Llama(SMALL, seed=5, backend="numpy")
    path = model.save_llmc_checkpoint(tmp_path / "llama.bin")
    loaded = Llama.from_llmc_checkpoint(path, backend="numpy")
    assert loaded.config == SMALL
    assert loaded.params_memory.tobytes() == model.params_memory.tobytes()
    with pytest.raises(ValueError, match="LLaMA-style model file.*Llama.from_llmc_checkpoint"):
        GPT2.from_llmc_checkpoint(path)
    gpt2_path = GPT2(GPT2Config.from_name("tiny"), seed=0, backend="numpy").save_llmc_checkpoint(tmp_path / "g.bin")
    with pytest.raises(ValueError, match="GPT-2 model file.*GPT2.from_llmc_checkpoint"):
        Llama.from_llmc_checkpoint(gpt2_path)
    (tmp_path / "short.bin").write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="bytes"):
        Llama.from_llmc_checkpoint(tmp_path / "short.bin")


# ---------------------------------------------------------------------------------------------------------
# Generation with a key/value cache


def test_kv_cache_logits_equal_full_recomputation():
    model = _perturbed(SMALL)
    tokens = list(_batch(SMALL, B=1, T=9)[0][0])
    cache = KVCache(model)
    got = [forward_cached(cache, tokens[:4])]                       # the prompt at once, then one at a time
    got += [forward_cached(cache, [t]) for t in tokens[4:]]
    assert cache.length == len(tokens) and cache.k[0].shape == (9, SMALL.num_kv_heads * SMALL.head_size)
    model.forward(np.array([tokens]))
    np.testing.assert_allclose(np.concatenate(got), model.logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_generate_cached_equals_generate(path):
    model = _perturbed(SMALL)
    model.use_kernels = path == "kernels"
    for temperature, top_k in ((1.0, None), (0.8, 5), (0.0, None)):
        expected = generate(model, [3, 1, 4], 10, temperature=temperature, top_k=top_k, seed=11)
        assert generate_cached(model, [3, 1, 4], 10, temperature=temperature, top_k=top_k, seed=11) == expected
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_cached(model, [1] * 10, 7)


def test_block_names():
    assert LLAMA_BLOCK_PARAMETER_NAMES == ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw")


# ---------------------------------------------------------------------------------------------------------
# The trainer: the same loop, data, checkpoints and resume


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_trains_and_resumes_llama_tiny_exactly(tmp_path, capsys, precision):
    import json

    from llmc_lessons.data import write_tokens
    from llmc_lessons.train import DEFAULTS, Trainer, latest_checkpoint, main
    phrase = np.random.default_rng(0).integers(0, 50257, size=50)
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    write_tokens(train, np.tile(phrase, 60).astype(np.uint16))
    write_tokens(val, np.tile(phrase, 10).astype(np.uint16))

    def args(out):
        return dict(DEFAULTS, model="llama-tiny", batch_size=2, seq_len=16, steps=4, warmup=1, eval_every=2,
                    eval_batches=1, train_bin=str(train), val_bin=str(val), out=str(tmp_path / out),
                    reference=precision == "fp32", precision=precision)
    whole = Trainer(args("whole"))
    assert isinstance(whole.model, Llama)
    whole.run(progress=False)
    first = Trainer(args("split"))
    first.run(progress=False, stop_at=2)
    second = Trainer(args("split"), resume_from=latest_checkpoint(tmp_path / "split"))
    second.run(progress=False)
    log = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log("whole")] == [r["loss"] for r in log("split")]     # bit for bit
    assert log("whole")[-1]["loss"] < log("whole")[0]["loss"]
    # a GPT-2 run cannot continue from a LLaMA-style checkpoint
    assert main(["--resume", str(tmp_path / "whole"), "--model", "tiny", "--steps", "6"]) == 2
    assert "trained with --model llama-tiny" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# GPU only: the kernel path recorded into CUDA graphs trains exactly as one launch at a time


@pytest.mark.gpu
@pytest.mark.skipif(not device.on_gpu(), reason="CUDA graphs record GPU launches")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_train_as_plain_launches(precision):
    from llmc_lessons.train import training_step
    config = LlamaConfig(max_seq_len=64, num_layers=2, num_heads=4, num_kv_heads=2, channels=64, ffn_hidden=96)
    plain, graphed = (Llama(config, seed=3, backend="kernels", precision=precision) for _ in range(2))
    for m in (plain, graphed):
        m.keep_logits = False
    graphed.cuda_graph = True
    gen = np.random.default_rng(0)
    for step in range(1, 6):
        x, y = (gen.integers(0, config.vocab_size, (3, 24), dtype=np.int32) for _ in range(2))   # T = 24: bf16 too
        assert training_step(plain, x, y, 1e-3, 0.1, 1.0, step) == training_step(graphed, x, y, 1e-3, 0.1, 1.0, step)
    assert graphed._graphs["forward_graph"] is not None and graphed._graphs["backward_graph"] is not None
    assert np.array_equal(to_host(plain.params_memory), to_host(graphed.params_memory))


# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14's step): against the float32 NumPy path, at bf16's precision


BF16 = LlamaConfig(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                   channels=64, ffn_hidden=48)     # hs = 16: the tensor-core flash attention runs it


@pytest.mark.parametrize("NKV", [2, 1, 4])
def test_bf16_step_is_the_fp32_step_at_bf16_precision(NKV):
    import dataclasses
    c = dataclasses.replace(BF16, num_kv_heads=NKV)
    ref, bf16 = Llama(c, seed=1, backend="numpy"), Llama(c, seed=1, precision="bf16")
    gen = np.random.default_rng(NKV)
    idx, targets = (gen.integers(0, c.vocab_size, (2, 16)) for _ in range(2))
    for m in (ref, bf16):
        m.forward(idx, targets)
        m.zero_grad()
        m.backward()
    assert abs(bf16.mean_loss - ref.mean_loss) < 1e-2 * ref.mean_loss
    for name in LLAMA_PARAMETER_NAMES:
        got, want = to_host(bf16.gradient(name)), ref.grads[name]
        assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max(), name
    first = bf16.mean_loss
    for step in range(3):                        # AdamW on the float32 masters, the bf16 copy follows
        for m in (ref, bf16):
            m.update(1e-3, weight_decay=0.1)
            m.forward(idx, targets)
            m.zero_grad()
            m.backward()
        assert abs(bf16.mean_loss - ref.mean_loss) < 2e-2 * ref.mean_loss, step
    assert bf16.mean_loss < first and bf16.step == 3

