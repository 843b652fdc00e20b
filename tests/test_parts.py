"""The student's parts (llmc_lessons/parts.py): a passing check keeps the answer, later lessons load it, the
reference stands in for what is missing, and GPT-2 built from the solutions' parts trains like the reference."""
from __future__ import annotations

import ast
import json
import linecache
import math
import re

import numpy as np
import pytest
from test_delegation import check_of

from llmc_lessons import parts
from llmc_lessons.checks import REFERENCES   # the real table: a fixture of conftest.py empties the module's in tests
from llmc_lessons.parameters import GPT2Config
from llmc_lessons.your_model import first_divergent_part, model_parts, train_side_by_side

SCALE = 3.0


def cell_namespace(code: str, name: str, where: dict) -> dict:
    """Run `code` as a notebook cell does (its functions' source readable by inspect) in `where`."""
    filename = f"<cell {name}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exec(compile(code, filename, "exec"), where)
    return where


def solution_parts(repo_root, exercises):
    """Run the solution notebooks' answers to `exercises` (NumPy parts) through their checks, as a student who
    solved them would: each notebook's imports, the exercise cell, then the check cell."""
    by_lesson = {}
    for ex in exercises:
        by_lesson.setdefault(int(ex.split()[1].split(".")[0]), []).append(ex)
    for lesson, wanted in by_lesson.items():
        path = next((repo_root / "solutions").glob(f"{lesson:02d}_*.ipynb"))
        cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        imports = "\n".join(ast.unparse(node) for c in cells[1:] for node in ast.parse(c).body
                             if isinstance(node, (ast.Import, ast.ImportFrom)))
        ns = cell_namespace(imports, f"{path.stem} imports", {"__name__": "__main__"})
        done = 0        # the exercise cells run so far: an answer may use what an earlier one defined
        for ex in wanted:
            i = next(i for i, c in enumerate(cells) if c.startswith(f"# {ex}:"))
            for j in range(done, i + 1):
                if cells[j].startswith("# Exercise"):
                    answer = re.sub(r"^\s*### (BEGIN|END) SOLUTION\n", "", cells[j], flags=re.M)
                    cell_namespace(answer, f"{path.stem} {j}", ns)
            done = i + 1
            cell_namespace(cells[i + 1], f"{path.stem} {i + 1}", ns)


@pytest.mark.parametrize("spec", parts.SPECS, ids=lambda s: s.key)
def test_each_part_names_the_exercise_that_writes_it(spec):
    """parts.SPECS names exercises by number: renumbered exercises must be renumbered there too."""
    import inspect
    check = check_of(spec.exercise)
    if spec.kernel_file:
        assert check.__module__.endswith("." + spec.kernel_file[:-3]) and f'"{spec.name}"' in inspect.getsource(check)
    elif spec.module:
        assert spec.name in REFERENCES[spec.exercise]
    else:
        assert check.__name__ == "check_gradient_checker"


def scaled(x):
    return SCALE * x


def uses_helpers(x):
    return scaled(x) + np.float64(OFFSET) + math.pi * 0


OFFSET = 1.5


def test_a_function_is_kept_with_what_it_reads_from_its_notebook():
    source = parts.portable_source(uses_helpers)
    assert "SCALE = 3.0" in source and "OFFSET = 1.5" in source and "import numpy as np" in source
    assert "import math" in source and "def scaled" in source
    ns = {}
    exec(source, ns)
    assert ns["uses_helpers"](2.0) == 7.5


def test_what_cannot_be_kept_is_named():
    table = np.ones(3)

    def reads_an_array(x):
        return x + table_global
    globals()["table_global"] = table
    with pytest.raises(parts.PartNotKept, match="table_global"):
        parts.portable_source(reads_an_array)
    with pytest.raises(parts.PartNotKept, match="lambda"):
        parts.portable_source(lambda x: x)


def test_a_passing_check_keeps_the_answer_and_it_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    from llmc_lessons.checks.gelu import check_gelu_backward
    from llmc_lessons.layers.gelu import gelu_backward

    def my_gelu_backward(dout, inp):
        return gelu_backward(dout, inp) * 1.0
    check_gelu_backward(my_gelu_backward)
    assert "kept as your gelu_backward" in capsys.readouterr().out
    part = parts.load("gelu_backward")
    assert part.theirs and part.spec.exercise == "Exercise 6.2"
    x = np.linspace(-3, 3, 7)
    np.testing.assert_array_equal(part.value(np.ones(7), x), gelu_backward(np.ones(7), x))
    assert json.loads((tmp_path / "parts.json").read_text())["gelu_backward"]["function"] == "my_gelu_backward"


def test_a_failing_check_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    from llmc_lessons.checks import ExerciseFailed
    from llmc_lessons.checks.gelu import check_gelu_backward
    with pytest.raises(ExerciseFailed):
        check_gelu_backward(lambda dout, inp: dout)
    assert not parts.load("gelu_backward").theirs
    assert not (tmp_path / "parts.json").exists()


def test_a_kernel_is_kept_as_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    from llmc_lessons.checks.gelu import check_gelu_backward_kernel
    from llmc_lessons.cuda import kernel_source
    source = kernel_source("gelu.cu")
    check_gelu_backward_kernel(source)
    assert parts.load("gelu.cu:gelu_backward_kernel").value == source


def test_the_reference_stands_in_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    assert "Exercise 4.2 not passed yet" in parts.load("matmul_backward").reason
    parts.record("Exercise 4.2", scaled)
    (tmp_path / "matmul_backward.py").write_text("def scaled(x):\n    return x\n")
    assert "changed since" in parts.load("matmul_backward").reason
    (tmp_path / "matmul_backward.py").write_text("def scaled(x) return\n")
    index = json.loads((tmp_path / "parts.json").read_text())
    import hashlib
    index["matmul_backward"]["sha256"] = hashlib.sha256(b"def scaled(x) return\n").hexdigest()
    (tmp_path / "parts.json").write_text(json.dumps(index))
    assert "does not load (SyntaxError" in parts.load("matmul_backward").reason
    table = parts.table(model_parts(tmp_path))
    assert "matmul_backward" in table and "yours" not in table


def test_an_exercise_of_two_functions_keeps_each_by_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))

    def crossentropy_forward(probs, targets):
        return -np.log(probs)
    assert "kept as your crossentropy_forward" in parts.record("Exercise 8.0", crossentropy_forward)
    assert "named softmax_forward and crossentropy_forward" in parts.record("Exercise 8.0", scaled)
    assert parts.load("crossentropy_forward").theirs and not parts.load("softmax_forward").theirs


def test_an_unwritable_folder_does_not_fail_the_check(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path / "file" / "parts"))
    assert "not kept as your matmul_backward" in parts.record("Exercise 4.2", scaled)


NUMPY_EXERCISES = [s.exercise for s in parts.SPECS if s.module]
TINY = GPT2Config(max_seq_len=16, vocab_size=61, padded_vocab_size=64, num_layers=2, num_heads=2, channels=16)


def batches(n, B=2, T=8, seed=0):
    gen = np.random.default_rng(seed)
    return [(gen.integers(0, TINY.vocab_size, (B, T)).astype(np.int32),
             gen.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)) for _ in range(n)]


@pytest.fixture(scope="module")
def solutions_store(repo_root, tmp_path_factory):
    where = tmp_path_factory.mktemp("parts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMC_PARTS", str(where))
        solution_parts(repo_root, NUMPY_EXERCISES)
    return where


def test_the_solutions_keep_every_numpy_part(solutions_store):
    loaded = model_parts(solutions_store)
    assert all(loaded[s.key].theirs for s in parts.SPECS if s.module), parts.table(loaded)


def test_gpt2_from_the_solutions_parts_trains_like_the_reference(solutions_store):
    rows = train_side_by_side(TINY, batches(3), model_parts(solutions_store))
    assert all(r["same"] for r in rows), rows
    assert first_divergent_part(TINY, batches(2), model_parts(solutions_store)) is None


def test_a_training_step_runs_every_numpy_part(solutions_store):
    """The forwards, the backwards and the update: a step of the NumPy path calls each of the solutions' parts."""
    from llmc_lessons.model import GPT2
    from llmc_lessons.train import training_step
    used: set = set()
    with parts.substituted(model_parts(solutions_store).values(), used=used):
        training_step(GPT2(TINY, seed=0, backend="numpy"), *batches(1)[0], 1e-3, 0.0, 1.0, 1)
    assert used == {s.key for s in parts.SPECS if s.module and s.trained}


BREAK = """
_right = {name}


def {name}(*args, **kwargs):   # 1% off: a slip of the kind a check with a loose tolerance would let through
    result = _right(*args, **kwargs)
    return tuple(x * 1.01 for x in result) if isinstance(result, tuple) else result * 1.01
"""


@pytest.mark.parametrize("broken", ["layernorm_forward", "attention_forward", "softmax_forward", "crossentropy_forward",
                                    "gelu_backward", "matmul_backward", "adamw_update"])
def test_a_broken_part_is_named(solutions_store, broken, tmp_path):
    import hashlib
    for f in solutions_store.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "parts.json").read_text())
    entry = index[broken]
    data = (tmp_path / entry["file"]).read_bytes() + BREAK.format(name=entry["function"]).encode()
    (tmp_path / entry["file"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "parts.json").write_text(json.dumps(index))
    loaded = model_parts(tmp_path)
    rows = train_side_by_side(TINY, batches(2), loaded)
    assert not all(r["same"] for r in rows)
    step, key, why = first_divergent_part(TINY, batches(2), loaded)
    assert (step, key) == (1, broken), why


def my_grad_check(loss, x, grad, seed=0):
    x = np.asarray(x, dtype=np.float64)
    v = np.random.default_rng(seed).standard_normal(x.shape)
    numeric = (loss(x + 1e-6 * v) - loss(x - 1e-6 * v)) / 2e-6
    analytic = float(np.sum(np.asarray(grad, dtype=np.float64) * v))
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-300)


def my_gelu_backward_off(dout, inp):   # the derivative of the tanh without its 1 - tanh^2: a plausible slip
    k, a = math.sqrt(2.0 / math.pi), 0.044715
    th = np.tanh(k * (inp + a * inp ** 3))
    return (0.5 * (1 + th) + 0.5 * inp * k * (1 + 3 * a * inp ** 2)) * dout


def gelu_report():
    from llmc_lessons.gradcheck import gradcheck
    from llmc_lessons.layers import gelu as gl
    inputs = {"inp": np.random.default_rng(0).uniform(-3, 3, size=(2, 7))}
    return gradcheck(lambda inp: gl.gelu_forward(inp), lambda dy, inp: {"inp": gl.gelu_backward(dy, inp)}, inputs,
                     theirs=True)


def test_gradcheck_runs_the_students_checker_and_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    text = str(gelu_report())
    assert "none of your parts" in text and "your gradient checker: Exercise 0.3 not passed yet" in text
    parts.record("Exercise 0.3", my_grad_check)
    parts.record("Exercise 6.2", my_gelu_backward_off)
    report = gelu_report()
    assert report.passed                                    # the verdict stays the package's, on its backward
    lines = report.theirs
    assert "with your gelu_backward, checked by the package: dinp" in lines[0] and "FAIL" in lines[0]
    assert "on the package's backward: dinp" in lines[1] and lines[1].endswith("ok")
    assert "your gradient checker with your gelu_backward" in lines[2] and lines[2].endswith("FAIL")


def test_gradcheck_runs_the_students_code_only_when_asked(tmp_path, monkeypatch):
    # the package's own checks (gradcheck_gpt2, the tests) leave theirs off: no part is loaded, none runs
    from llmc_lessons.gradcheck import gradcheck
    from llmc_lessons.gradcheck_gpt2 import gradcheck_gpt2
    from llmc_lessons.layers import gelu as gl
    from llmc_lessons.parameters import GPT2Config
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    parts.record("Exercise 0.3", my_grad_check)
    parts.record("Exercise 6.2", my_gelu_backward_off)

    def refused(*args, **kwargs):
        raise AssertionError("the student's parts were loaded")
    monkeypatch.setattr(parts, "load_all", refused)
    inputs = {"inp": np.random.default_rng(0).uniform(-3, 3, size=(2, 7))}
    report = gradcheck(lambda inp: gl.gelu_forward(inp), lambda dy, inp: {"inp": gl.gelu_backward(dy, inp)}, inputs)
    assert report.passed and report.theirs == [] and "your" not in str(report)
    small = GPT2Config(max_seq_len=8, vocab_size=11, padded_vocab_size=16, num_layers=1, num_heads=1, channels=4)
    whole = gradcheck_gpt2(small, B=1, T=3, checks_per_tensor=2)
    assert whole.passed and whole.theirs == []
    with pytest.raises(AssertionError, match="were loaded"):
        gelu_report()


KERNEL_EXERCISES = [s.exercise for s in parts.SPECS if s.kernel_file]


def replace_part(where, key, old, new):
    """Edit the stored source of a part as a student would, and keep the index's hash in step."""
    import hashlib
    index = json.loads((where / "parts.json").read_text())
    path = where / index[key]["file"]
    source = path.read_text()
    assert old in source
    path.write_text(source.replace(old, new))
    index[key]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (where / "parts.json").write_text(json.dumps(index))


def test_the_kernel_path_runs_the_solutions_kernels(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    solution_parts(repo_root, KERNEL_EXERCISES)
    loaded = model_parts(tmp_path)
    assert all(loaded[s.key].theirs for s in parts.SPECS if s.kernel_file), parts.table(loaded)
    from llmc_lessons import cuda
    launched, compile_theirs = set(), cuda._replacement_kernel
    monkeypatch.setattr(cuda, "_replacement_kernel",
                        lambda code, name, options: launched.add(name) or compile_theirs(code, name, options))
    assert all(r["same"] for r in train_side_by_side(TINY, batches(2), loaded, backend="kernels"))
    assert launched == {s.name for s in parts.SPECS if s.kernel_file and s.trained}
    replace_part(tmp_path, "gelu.cu:gelu_backward_kernel", "dinp[i] = local_grad", "dinp[i] = 1.01f * local_grad")
    rows = train_side_by_side(TINY, batches(2), model_parts(tmp_path), backend="kernels")
    assert rows[0]["yours"] == rows[0]["reference"]      # the first loss comes before any backward,
    assert not rows[0]["same"]                            # the weights after it do not


@pytest.mark.parametrize("key,old,new", [
    ("gelu.cu:gelu_forward_kernel1", "out[i] = 0.5f", "out[i] = 0.505f"),
    ("residual.cu:residual_forward_kernel", "out[i] = inp1[i] + inp2[i]", "out[i] = inp1[i] + 1.01f * inp2[i]"),
])
def test_a_broken_forward_kernel_changes_the_first_loss(repo_root, tmp_path, monkeypatch, key, old, new):
    """The kernel path launches the student's GELU forward and residual kernels: a wrong one shows in the loss."""
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    solution_parts(repo_root, [parts.BY_KEY[key].exercise])
    replace_part(tmp_path, key, old, new)
    rows = train_side_by_side(TINY, batches(1), model_parts(tmp_path), backend="kernels")
    assert rows[0]["yours"] != rows[0]["reference"] and not rows[0]["same"]


@pytest.mark.gpu
def test_gpt2_124m_trains_with_the_solutions_kernels(repo_root, tmp_path, monkeypatch):
    """On a GPU: GPT-2 124M with the solutions' kernels, beside the package's, five steps (the table is printed:
    run with -s to keep it)."""
    from llmc_lessons import device
    from llmc_lessons.data import DataLoader, prepare_shakespeare
    from llmc_lessons.your_model import format_side_by_side
    if not device.on_gpu():
        pytest.skip("GPT-2 124M on the kernel path needs a GPU")
    monkeypatch.setenv("LLMC_PARTS", str(tmp_path))
    solution_parts(repo_root, KERNEL_EXERCISES)
    loader = DataLoader(prepare_shakespeare()[0], B=4, T=1024)
    rows = train_side_by_side(GPT2Config.from_name("d12"), [loader.next_batch() for _ in range(5)],
                              model_parts(tmp_path), lr=6e-4, backend="kernels")
    print(format_side_by_side(rows))
    assert all(r["same"] for r in rows)


def test_a_failing_part_leaves_the_package_as_it_was(solutions_store, tmp_path):
    from llmc_lessons.layers import block, gelu
    for f in solutions_store.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    replace_part(tmp_path, "gelu_backward", "    return dinp", "    raise ValueError('not yet')")
    reference = gelu.gelu_backward
    rows = train_side_by_side(TINY, batches(2), model_parts(tmp_path))
    assert len(rows) == 1 and not rows[0]["same"] and rows[0]["error"] == "ValueError: not yet"
    assert block.gelu_backward is reference and gelu.gelu_backward is reference
    step, key, why = first_divergent_part(TINY, batches(1), model_parts(tmp_path))
    assert key == "gelu_backward" and "raised ValueError: not yet" in why
