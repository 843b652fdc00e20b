"""The package's layering, written down once: a module imports only modules of its own layer or of a lower one,
and no chain of imports comes back to where it started (imports inside functions count too).

Lowest first. A module is in the layer that names it or the package nearest above it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmc_lessons"

LAYERS = (
    ("base", ("llmc_lessons", "llmc_lessons.device", "llmc_lessons.cuda.source", "llmc_lessons.gradcheck",
              "llmc_lessons.tokenizer", "llmc_lessons.files",
              "llmc_lessons.parts")),
    ("cuda", ("llmc_lessons.cuda",)),                   # the emulator and the same-call RawKernel
    ("seeing the memory", ("llmc_lessons.memview",)),  # draws the traces of cuda.trace
    ("precision", ("llmc_lessons.precision",)),         # bf16 conversions, the TF32 switch
    ("measuring", ("llmc_lessons.timing", "llmc_lessons.perf")),
    ("cublas", ("llmc_lessons.cublas",)),
    ("layers", ("llmc_lessons.layers",)),               # one module per layer: references and launchers
    ("data", ("llmc_lessons.data",)),
    ("parameters", ("llmc_lessons.parameters",)),      # GPT-2's config and llm.c's parameter layout
    ("paths", ("llmc_lessons.paths",)),                # forward, backward, update: NumPy, fp32 and bf16 kernels
    ("model", ("llmc_lessons.model", "llmc_lessons.activations", "llmc_lessons.sampling")),
    ("LLaMA-style model", ("llmc_lessons.llama",)),     # GPT2 with LLaMA's layers, layout and checkpoint header
    ("checks of the model", ("llmc_lessons.gradcheck_gpt2",)),
    ("weights", ("llmc_lessons.hf",)),                 # Hugging Face GPT-2 folders <-> llm.c model files
    ("distributed", ("llmc_lessons.distributed",)),    # collectives, the launcher, ZeRO-1 (lesson 17)
    ("uses of the model", ("llmc_lessons.train", "llmc_lessons.torch_gpt2", "llmc_lessons.torch_llama",
                           "llmc_lessons.verify", "llmc_lessons.hellaswag", "llmc_lessons.your_model")),
    ("bench", ("llmc_lessons.bench",)),
    ("checks", ("llmc_lessons.checks",)),               # the exercises' checks may use anything below
    ("notebook cells", ("llmc_lessons.nbgrader_meta", "llmc_lessons.setup_cell")),   # what the builder writes
    ("commands", ("llmc_lessons.exercises", "llmc_lessons.__main__")),
    ("nbgrader's configuration", ("llmc_lessons.nbgrader_config",)),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "llmc_lessons" and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[1]):
                best = (i, len(name))
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: add it to LAYERS"
    return best[0]


def imports_of(module: str) -> dict:
    """{imported package module: line} for every import in the module's source, top-level or in a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:   # `from llmc_lessons.layers import bf16`: the submodule itself
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in MODULES else base)
        for target in targets:
            if target in MODULES and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_lower_layer_imports_a_higher_one(module):
    here = layer_of(module)
    for target, line in GRAPH[module].items():
        there = layer_of(target)
        assert there <= here, (f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} "
                               f"(layer '{LAYERS[there][0]}') from layer '{LAYERS[here][0]}': "
                               f"a lower layer must not import a higher one")


def find_cycle(graph: dict):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_cycles_and_upward_imports():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None
    assert layer_of("llmc_lessons.cublas") > layer_of("llmc_lessons.precision")
    assert layer_of("llmc_lessons.layers.bf16") == layer_of("llmc_lessons.layers")
    assert layer_of("llmc_lessons.cuda.source") < layer_of("llmc_lessons.cuda.emulator")
    assert "llmc_lessons.precision" in GRAPH["llmc_lessons.cublas"]
    assert "llmc_lessons.cuda" in GRAPH["llmc_lessons.layers.matmul"]       # function-local imports count
