"""The package's shape, as the README's Layout section draws it: small modules and
functions, imports that run one way (no cycle, also through imports inside functions),
and registries whose metadata agrees with what they name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "vqstudy"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def internal_imports(name: str, path: Path) -> set[str]:
    """vqstudy modules `name` imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    known, found = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = submodules or [base]   # `from . import fields` imports the module, not the package
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


@pytest.mark.parametrize("name", list(modules()))
def test_module_and_function_sizes(name):
    """No module over ~300 lines, no function over ~60: each file one job, readable in one sitting."""
    path = modules()[name]
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path}: {lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}: {length} lines"


def test_no_import_cycle():
    """The import graph of the package (imports inside functions included) has no cycle."""
    graph = {name: internal_imports(name, path) for name, path in modules().items()}
    # a package's __init__ importing its own submodules is not a cycle through them
    graph = {n: {t for t in ts if not (n == t.rsplit(".", 1)[0])} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_quantizer_entries_match_their_implementations():
    """A registry entry's metadata tells the truth: k-means applies exactly to the methods
    with init_from_data; every modality it claims exists."""
    from vqstudy.modalities import MODALITIES
    from vqstudy.registry import QUANTIZERS

    for name in QUANTIZERS:
        entry = QUANTIZERS.entry(name)
        assert entry.kmeans == hasattr(QUANTIZERS[name], "init_from_data"), name
        assert set(entry.modalities) <= set(MODALITIES), name


def test_modality_table_paths_resolve():
    """Every modality's autoencoder builder and figures import; every dataset names a modality."""
    from vqstudy.modalities import MODALITIES
    from vqstudy.registry import DATASETS, load

    for modality in MODALITIES.values():
        assert callable(load(modality.autoencoder))
        assert all(callable(load(f)) for f in modality.figures)
    assert {DATASETS.entry(name).modality for name in DATASETS} <= set(MODALITIES)
