"""GPT2.cuda_graph: the forward with its loss and the backward recorded into CUDA graphs and replayed. On a GPU
the replayed steps must train exactly as one launch at a time does, record once per key and record again when
the shape, the TF32 switch or the parameter buffer changes. On a CPU the switch changes nothing."""
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.perf import count_launches
from llmc_lessons.train import training_step

CONFIG = GPT2Config(num_layers=2, num_heads=4, channels=64, max_seq_len=64)   # hs = 16: bf16 runs it too
gpu = pytest.mark.skipif(not device.on_gpu(), reason="CUDA graphs record GPU launches")


def batches(n, B, T, seed=0):
    gen = np.random.default_rng(seed)
    return [(gen.integers(0, CONFIG.vocab_size, (B, T), dtype=np.int32),
             gen.integers(0, CONFIG.vocab_size, (B, T), dtype=np.int32)) for _ in range(n)]


def train(model, data, start=1):
    """(losses, gradient norms) of one training step per batch."""
    out = [training_step(model, x, y, 1e-3, 0.1, 1.0, start + i) for i, (x, y) in enumerate(data)]
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def twins(precision):
    plain = GPT2(CONFIG, seed=3, backend="kernels", precision=precision)
    graphed = GPT2(CONFIG, seed=3, backend="kernels", precision=precision)
    for m in (plain, graphed):
        m.keep_logits = False
    graphed.cuda_graph = True
    return plain, graphed


def assert_same_training(plain, graphed, data, start=1):
    want_loss, want_norm = train(plain, data, start)
    loss, norm = train(graphed, data, start)
    # The same kernels in the same order, every sum in a fixed order (no atomics: the global norm adds its
    # blocks' partial sums in order), and cuBLAS with the same workspace whether a stream records or not: the
    # same bits. Anything less shows in bf16: AdamW divides by sqrt(v), so where a gradient is ~0 a last-bit
    # difference moves a weight by a visible part of a step, and the next forward differs in more places.
    np.testing.assert_array_equal(loss, want_loss, err_msg="replayed steps give other losses")
    np.testing.assert_array_equal(norm, want_norm, err_msg="replayed steps give other gradient norms")
    diff = np.abs(device.to_host(graphed.params_memory) - device.to_host(plain.params_memory))
    assert not diff.any(), f"replayed steps end at other weights: {np.mean(diff > 0):.2%} differ, at most by " \
                           f"{diff.max():.2e}"


@gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_replayed_steps_train_as_plain_launches(precision):
    plain, graphed = twins(precision)
    assert_same_training(plain, graphed, batches(6, 3, 24))
    g = graphed._graphs
    assert g["forward_graph"] is not None and g["backward_graph"] is not None, "the graphs were never recorded"
    x, y = batches(1, 3, 24, seed=1)[0]
    with count_launches() as launches:
        training_step(graphed, x, y, 1e-3, 0.1, 1.0, 7)
    # a replay launches nothing from Python but the encoder's backward, the norm and AdamW
    assert not any("layernorm" in name or "gemm" in name or "attention" in name for name in launches), launches
    assert sum(launches.values()) < 20, launches


@gpu
def test_plain_steps_repeat():
    # The check above holds only if launching the same steps twice, with no graph, trains the same weights.
    first, second = (GPT2(CONFIG, seed=3, backend="kernels", precision="bf16") for _ in range(2))
    assert_same_training(first, second, batches(6, 3, 24))


@gpu
def test_a_new_shape_tf32_switch_or_parameter_buffer_records_again():
    from llmc_lessons.precision import tf32
    plain, graphed = twins("fp32")
    assert_same_training(plain, graphed, batches(4, 3, 24))
    first = graphed._graphs["forward_graph"]
    assert_same_training(plain, graphed, batches(4, 2, 40, seed=2), start=5)        # another (B, T)
    assert graphed._graphs["forward_graph"] is not first
    second = graphed._graphs["forward_graph"]
    with tf32(not graphed._graphs["key"][3]):
        assert_same_training(plain, graphed, batches(3, 2, 40, seed=3), start=9)
    assert graphed._graphs["forward_graph"] is not second
    third = graphed._graphs["forward_graph"]
    for m in (plain, graphed):      # new weights in a new buffer, as a loaded checkpoint brings
        m._set_params_memory(device.to_host(m.params_memory) * 0.5)
    assert_same_training(plain, graphed, batches(3, 2, 40, seed=4), start=12)
    assert graphed._graphs["forward_graph"] is not third


@gpu
def test_evaluation_between_steps_and_one_backward_per_forward():
    plain, graphed = twins("bf16")
    data = batches(5, 2, 16)
    train(plain, data[:3])
    train(graphed, data[:3])
    x, y = data[3]
    assert graphed.forward(x, y) == pytest.approx(plain.forward(x, y), rel=1e-4)   # a replay with no backward
    graphed.zero_grad()
    graphed.backward()
    with pytest.raises(RuntimeError, match="each forward allows one backward"):
        graphed.backward()
    assert_same_training(plain, graphed, data[4:], start=4)


def test_the_switch_changes_nothing_without_a_gpu():
    if device.on_gpu():
        pytest.skip("on a GPU the tests above check the graphs")
    plain, graphed = twins("fp32")
    assert_same_training(plain, graphed, batches(3, 2, 8))
    assert graphed._graphs is None
