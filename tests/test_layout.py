"""The house plan, checked: no import circles, stages free of Prefect/FastAPI/distributed, small
modules, test hooks only in ``pipeline/testing`` (see docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows")
STAGES = ("pipeline", "pipeline.ingest", "pipeline.train", "pipeline.segment", "pipeline.qc", "pipeline.service")
SERVICES = ("prefect", "fastapi", "uvicorn", "distributed")
MAX_MODULE_LINES = 500
MAX_FLOWS_LINES = 950


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (module level, functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_circles() -> None:
    modules = _modules()
    # ``pipeline/__init__`` is the lazy facade over every stage (its imports are for type checkers
    # only), and modules import ``__version__`` from it: it is left out of the graph
    graph = {name: _imports(path, name, modules) - {"pipeline"} for name, path in modules.items() if name != "pipeline"}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_pipeline_imports_no_services() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(STAGES)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(SERVICES)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_small(package: str) -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_flows_is_glue_only() -> None:
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "flows").rglob("*.py"))
    assert lines <= MAX_FLOWS_LINES, f"flows/ has {lines} lines of Python (at most {MAX_FLOWS_LINES})"


def test_stages_are_packages() -> None:
    for stage in ("core", "io", "models", "ingest", "train", "segment", "qc", "compute", "service", "testing", "cli"):
        assert (ROOT / "pipeline" / stage / "__init__.py").is_file(), stage
    flat = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name not in ("__init__.py", "demo.py"))
    assert flat == [], f"modules outside the stage folders: {flat}"


def test_no_test_hooks_in_production_modules() -> None:
    hooks = ("fail_first_attempt", "hang_first_attempt", "inject_fault", "_inject", "kill_worker", "STUDIOS_TEST_")
    offenders = [
        str(p.relative_to(ROOT))
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "testing" not in p.relative_to(ROOT).parts and any(h in p.read_text() for h in hooks)
    ]
    assert not offenders, f"test hooks outside pipeline/testing: {offenders}"
