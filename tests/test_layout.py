"""The library's layers: every module of rlhf/ belongs to one, imports only point down (or within its layer),
and no modules import each other in a circle. A new module must be given a layer here (and in docs/design.md, "Module layers")."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom first; a module may import from its own layer and the layers below it
LAYERS = [
    ("foundations", ["rlhf", "rlhf.errors", "rlhf.progress", "rlhf.plugins", "rlhf.compat", "rlhf.sequences",
                     "rlhf.chat"]),
    ("config, data, runs", ["rlhf.config", "rlhf.checks", "rlhf.tracking", "rlhf.data", "rlhf.data.*", "rlhf.runs",
                            "rlhf.distributed", "rlhf.preempt"]),
    ("models and adapters", ["rlhf.models"]),
    ("generation and scoring", ["rlhf.generation", "rlhf.vllm_engine", "rlhf.rm", "rlhf.rm.scoring", "rlhf.reward_sources", "rlhf.eval",
                                "rlhf.eval.stats", "rlhf.eval.degeneration"]),
    ("stage libraries", ["rlhf.trainers", "rlhf.sft", "rlhf.rm.*", "rlhf.dpo", "rlhf.eval.*", "rlhf.export",
                         "rlhf.model_card"]),
    ("RL stage (uses eval's judging)", ["rlhf.ppo", "rlhf.ppo.*"]),
    ("launch", ["rlhf.preflight", "rlhf.cli", "rlhf.slurm"]),
    ("demo tasks and stand-in models", ["rlhf.demo", "rlhf.demo.*"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "rlhf").rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The rlhf modules `path` imports, anywhere in the file (lazy imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "rlhf"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "rlhf":
            subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            out |= subs
            if len(subs) < len(node.names):  # names from the module itself, not only its submodules
                out.add(node.module)
    return out & known


def layer_of(name: str) -> int:
    found = [i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch(name, p) for p in patterns)]
    if not found:
        pytest.fail(f"{name} is in no layer of tests/test_layout.py: give it one (and a row in docs/design.md, 'Module layers')")
    return found[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer_and_imports_point_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in graph().items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other_in_a_circle():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    # an upward import and a circle, on a made-up graph: the checks must see both
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("rlhf.generation") > layer_of("rlhf.sequences")
    assert layer_of("rlhf.ppo.train") > layer_of("rlhf.eval.run") > layer_of("rlhf.models")
    src = ROOT / "rlhf" / "sequences.py"
    assert imports(src, set(modules())) == set()  # the bottom of the stack imports nothing of the pipeline
