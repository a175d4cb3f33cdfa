"""The architecture holds: todo_core never imports ComfyUI, library code never prints."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "todo_core").rglob("*.py"))
COMMAND_LINE_MODULES = {"demo.py", "__main__.py"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_todo_core_does_not_import_comfyui():
    assert CORE
    for path in CORE:
        assert not imported_modules(path) & {"comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths"}, path


def test_library_code_logs_instead_of_printing():
    library = [p for p in CORE if p.name not in COMMAND_LINE_MODULES] + [ROOT / "nodes.py", ROOT / "__init__.py"]
    for path in library:
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        assert not [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "print"], path


def test_python_sources_encode_on_windows():
    """comfy-test's syntax level refuses source characters that Windows' cp1252 cannot encode."""
    sources = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert len(sources) > 10
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                line.encode("cp1252")
            except UnicodeEncodeError as error:
                raise AssertionError(f"{path.relative_to(ROOT)}:{number}: {error.object[error.start]!r}") from None
