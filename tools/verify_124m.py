"""GPT-2 124M on a GPU: the course's kernel path against PyTorch (CUDA) and against the course's NumPy path,
on the same weights and batch. Prints the max relative difference of the logits, the loss and all 16
gradients, and exits 1 if any exceeds its tolerance.

    LLMC_DEVICE=gpu python tools/verify_124m.py [--batch-size 4 --seq-len 128]

Float32 everywhere and TF32 off (on both sides), so the differences are float32 rounding in another order.
"""
import argparse
import sys
import time

import numpy as np

from llmc_lessons import device
from llmc_lessons.precision import set_tf32
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.parameters import PARAMETER_NAMES


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    if not device.on_gpu():
        print("needs a GPU (LLMC_DEVICE=gpu)", file=sys.stderr)
        return 1
    import torch
    from llmc_lessons.torch_gpt2 import from_course, llmc_grads
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    set_tf32(False)
    config = GPT2Config.from_name("d12")
    gen = np.random.default_rng(0)
    x = gen.integers(0, config.vocab_size, (a.batch_size, a.seq_len)).astype(np.int32)
    y = gen.integers(0, config.vocab_size, (a.batch_size, a.seq_len)).astype(np.int32)
    print(f"{device.describe()}; torch {torch.__version__}; GPT-2 124M, B={a.batch_size}, T={a.seq_len}, TF32 off")

    model = GPT2(config, seed=0, backend="kernels")
    t = time.perf_counter()
    loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    device.synchronize()
    ours = dict(logits=device.to_host(model.logits)[..., :config.vocab_size], loss=np.float32(loss),
                **{"d" + n: device.to_host(model.grads[n]) for n in PARAMETER_NAMES})
    print(f"course kernels: loss {loss:.6f} ({time.perf_counter() - t:.1f} s with compilation)")

    ref = from_course(model, torch_device="cuda")
    logits, tloss = ref(torch.from_numpy(x.astype(np.int64)).cuda(), torch.from_numpy(y.astype(np.int64)).cuda())
    tloss.backward()
    theirs = dict(logits=logits.detach().cpu().numpy(), loss=np.float32(tloss.item()),
                  **{"d" + n: g for n, g in llmc_grads(ref).items()})
    print(f"PyTorch CUDA:   loss {tloss.item():.6f}")

    model.use_kernels = False  # the same weights, through the NumPy reference layers on the host
    t = time.perf_counter()
    nloss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    numpy_ = dict(logits=model.logits[..., :config.vocab_size], loss=np.float32(nloss),
                  **{"d" + n: model.grads[n] for n in PARAMETER_NAMES})
    print(f"course NumPy:   loss {nloss:.6f} ({time.perf_counter() - t:.1f} s)")

    tol = {"logits": 1e-4, "loss": 1e-5}
    print(f"\n{'tensor':<12}{'vs PyTorch':>12}{'vs NumPy':>12}  tolerance")
    ok = True
    for name in ours:
        r1, r2 = rel(ours[name], theirs[name]), rel(ours[name], numpy_[name])
        t_ = tol.get(name, 1e-4)
        good = r1 <= t_ and r2 <= t_
        ok &= good
        print(f"{name:<12}{r1:>12.1e}{r2:>12.1e}  {t_:.0e} {'ok' if good else 'FAIL'}")
    print("\nall within tolerance" if ok else "\nSOME TENSORS DIFFER BEYOND TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
