"""The shape of the cepe package: its modules import each other without a cycle (counting imports
inside functions too, so none is needed to dodge one), the readers only read, and one builder
makes every core model."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cepe"
READERS = ("safetensors_io", "gguf_io")
BUILDING = ("build", "load", "attach", "model", "train", "head")


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
    """The package's modules that `tree` imports anywhere (functions included; `if TYPE_CHECKING:`
    blocks left out: they never run). `from . import x` counts as x when x is a module, else as
    the package's __init__."""
    out: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name if a.name in names else "__init__" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cepe."):
            out.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cepe."))
        stack.extend(ast.iter_child_nodes(node))
    return out & names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    names = set(mods)
    return {name: _imports(tree, names) - {name} for name, tree in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_imports_without_a_cycle():
    graph = _graph()
    assert {"load", "gguf_io", "tokenizer", "build", "head"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_readers_only_read():
    graph = _graph()
    for reader in READERS:
        assert not graph[reader] & set(BUILDING), f"{reader} imports {sorted(graph[reader] & set(BUILDING))}"


def test_one_builder_makes_every_core_model():
    """cepe_c.Model(...) is called in cepe/build.py and nowhere else in the package."""
    callers = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Model"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "cepe_c"
            ):
                callers.add(name)
    assert callers == {"build"}


def test_import_cepe_leaves_heavy_modules_unimported():
    """`import cepe` stays light: the libraries only some calls need (tokenizers, the chat template's
    jinja2, tqdm's bars and asyncio, the gguf package, torch) are imported by those calls."""
    import subprocess
    import sys

    heavy = ("tokenizers", "jinja2", "tqdm", "asyncio", "gguf", "torch", "transformers", "sentencepiece")
    code = f"import sys, cepe; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "", out.stdout


def test_hidden_progress_bars_leave_tqdm_unimported():
    """cepe.progress.bar shows tqdm's bar exactly when tqdm would, importing it only then."""
    import subprocess
    import sys

    code = (
        "import sys; from cepe.progress import bar, shows, track\n"
        "with bar(total=3, disable=None) as b: b.update(1); b.set_postfix(x=1)\n"
        "print(shows(None), shows(True), shows(False), 'tqdm' in sys.modules)\n"
        "items = [1, 2]; print(track(items, disable=None) is items, 'tqdm' in sys.modules)\n"
        "b = bar(total=3, disable=False, file=sys.stdout); b.update(1); b.close()\n"
        "print(list(track(items, disable=False, file=sys.stdout)) == items)\n"
        "print(type(b).__module__.split('.')[0])\n"
    )
    out = subprocess.run(  # stderr is a pipe: tqdm's auto mode would hide the bar
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    assert out.stdout.splitlines()[0] == "False False True False", out.stdout
    assert out.stdout.splitlines()[1] == "True False", out.stdout
    assert out.stdout.splitlines()[-2] == "True", out.stdout
    assert out.stdout.splitlines()[-1] == "tqdm", out.stdout


def test_only_cepe_progress_imports_tqdm():
    """Every bar goes through cepe.progress, so no command pays tqdm's import where no bar shows."""
    sources = {p.name: p.read_text(encoding="utf-8") for p in PACKAGE.glob("*.py") if p.name != "progress.py"}
    importers = sorted(name for name, src in sources.items() if "import tqdm" in src or "from tqdm" in src)
    assert importers == [], importers
