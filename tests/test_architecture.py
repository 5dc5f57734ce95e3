"""The architecture stays visible: layers only import downwards, no cycles, short functions.

The layering contract itself is in pyproject.toml ([tool.importlinter]) and docs/architecture.md
draws it; `lint-imports` runs in .ci/run, and here against a copy with a violating import to
show that the check bites.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "bigmodel"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
LAYERS = [
    "cli",
    "accelerate",
    "api",
    "execution",
    "placement",
    "checkpoint",
    "storage",
    "foundations",
    "models",
]
#: Functions allowed above the length limit, each with the reason.
LONG_FUNCTIONS: dict[str, str] = {}
MAX_FUNCTION_LINES = 60


def _lint_imports(pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_module_lives_in_a_layer_package():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.name.endswith(".py") or p.is_dir())
    loose = [n for n in top if n not in {"__init__.py", "__main__.py", "__pycache__"}]
    assert sorted(loose) == sorted(LAYERS)
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc, f"bigmodel.{layer} says what its layer owns in its docstring"


def test_the_import_contract_holds():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_the_import_contract_fails_on_an_import_that_points_up(tmp_path):
    copy = tmp_path / "bigmodel"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "storage" / "atomic.py").open("a") as fh:
        fh.write("\nfrom bigmodel.api import load as _upward  # noqa: E402, F401\n")
    result = _lint_imports(pythonpath=tmp_path)
    assert result.returncode != 0
    assert "bigmodel.storage.atomic -> bigmodel.api.load" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("bigmodel", include_external_packages=False)
    graph.remove_module("bigmodel")  # the package root only re-exports
    assert _cycles(graph) == []


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring not counted."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def test_no_function_runs_past_sixty_lines_of_code():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{module}.{node.name}"
                if _code_lines(node) > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = _code_lines(node)
    assert long == {}, "split these into named steps (or list them with a reason): " + str(long)
