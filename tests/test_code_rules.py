"""House rules of the code base, checked on the source: short functions, no imports of other modules' private names."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "conditune"
MAX_FUNCTION_LINES = 100


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path.relative_to(root), ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def long_functions(root: Path) -> list[str]:
    found = []
    for path, tree in _modules(root):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def private_imports(root: Path) -> list[str]:
    found = []
    for path, tree in _modules(root):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("conditune"):
                found += [
                    f"{path}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    return found


def test_no_function_is_over_100_lines():
    assert long_functions(SRC) == []


def test_no_module_imports_another_modules_private_names():
    assert private_imports(SRC) == []


def test_the_rules_find_a_violation(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "bad.py").write_text(f"from conditune.io import _umask, atomic_write\n\n\ndef long():\n{body}\n")
    (tmp_path / "good.py").write_text("from conditune.io import atomic_write\n\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path) == [f"bad.py:4 long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert private_imports(tmp_path) == ["bad.py:1 conditune.io._umask"]
