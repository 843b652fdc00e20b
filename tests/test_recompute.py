"""Activation recomputation (model.recompute, llm.c's -r): the kernel paths drop the GELU's output (1) and the
LayerNorms' outputs too (2) after the forward and recompute them in the backward, with the forward's kernels on
the same inputs: the gradients are the same bits (in bf16, as each other's: level 0 takes the GELU from the fc
product's epilogue), and the activations kept between forward and backward shrink."""
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.device import to_host
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import GPT2Config
from llmc_lessons.paths import RECOMPUTED

SMALL = GPT2Config(max_seq_len=32, vocab_size=100, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
B, T = 2, 16


def kept_bytes(model) -> int:
    """The bytes of the activations the forward keeps for the backward, block by block."""
    return sum(a.nbytes for cache in model._cache["block_caches"] for a in cache.values() if a is not None)


def step(precision: str, recompute: int):
    gen = np.random.default_rng(0)
    x, y = (gen.integers(0, SMALL.vocab_size, (B, T)).astype(np.int32) for _ in range(2))
    model = GPT2(SMALL, seed=1, backend="kernels", precision=precision)
    model.recompute = recompute
    loss = model.forward(x, y)
    kept = kept_bytes(model)
    model.zero_grad()
    model.backward()
    return loss, to_host(model.grads_memory), kept


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recomputation_gives_the_same_gradients_and_keeps_less(precision):
    """In bf16 level 0 takes the GELU from the fc product's cuBLASLt epilogue, levels 1 and 2 from the GELU kernel
    that their backward runs again: levels 1 and 2 give level 0's bits in fp32 and each other's in bf16, where
    level 0 differs by the GELU's last bit here and there."""
    runs = {level: step(precision, level) for level in (0, 1, 2)}
    kept0 = runs[0][2]
    want_loss, want_grads, _ = runs[1 if precision == "bf16" else 0]
    act = 2 if precision == "bf16" else 4                         # bytes per activation value
    BTC, L = B * T * SMALL.channels, SMALL.num_layers
    for level, saved in ((1, L * 4 * BTC * act), (2, L * (4 + 2) * BTC * act)):
        loss, grads, kept = runs[level]
        assert loss == want_loss
        np.testing.assert_array_equal(grads, want_grads, err_msg=f"recompute={level}: the gradients differ")
        assert kept0 - kept == saved, f"recompute={level}: {kept0 - kept} bytes fewer kept, expected {saved}"
    loss0, grads0, _ = runs[0]
    assert abs(loss0 - want_loss) < 1e-4
    np.testing.assert_allclose(grads0, want_grads, atol=1e-2 * np.abs(want_grads).max())


def test_recompute_levels_are_named_and_checked():
    assert RECOMPUTED[1] == ("fch_gelu",) and set(RECOMPUTED[2]) == {"fch_gelu", "ln1", "ln2"}
    model = GPT2(SMALL, seed=1, backend="kernels")
    model.recompute = 3
    with pytest.raises(ValueError, match="0, 1 or 2"):
        model.forward(np.zeros((1, 8), np.int32), np.zeros((1, 8), np.int32))


@pytest.mark.gpu
def test_recomputation_lowers_the_gpu_memory_held_after_the_forward():
    if not device.on_gpu():
        pytest.skip("needs a GPU")
    pool = device.xp.get_default_memory_pool()
    used = []
    for level in (0, 2):
        model = GPT2(SMALL, seed=1, precision="bf16")
        model.recompute = level
        model.keep_logits = False
        before = pool.used_bytes()
        model.forward(np.zeros((B, T), np.int32), np.zeros((B, T), np.int32))
        used.append(pool.used_bytes() - before)
        del model
    assert used[1] < used[0]
