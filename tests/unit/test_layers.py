"""The pack's layers: cvx_core (host-free) <- host layer <- nodes; nothing imports tests/ or goes upward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Layer rank: a module may import only from its own rank or lower.
LAYERS = {"cvx_core": 0, "cvx_host": 1, "nodes": 2}
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "execution", "server")


def _pack_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level pack package) for every relative import in ``path`` that leaves its package."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] in ("tests", "harness", "test_nodes_testonly"):
            out.append((node.lineno, "tests"))
    return out


def test_no_upward_or_test_imports() -> None:
    bad = []
    for package, rank in LAYERS.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, target in _pack_imports(path):
                if target == "tests" or LAYERS.get(target, 99) > rank:
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "imports that go up a layer or into tests/:\n" + "\n".join(bad)


def test_cvx_core_imports_without_the_host() -> None:
    """Every cvx_core module imports in a fresh interpreter where any host module import fails."""
    modules = sorted(p.stem for p in (REPO / "cvx_core").glob("*.py") if p.stem != "__init__")
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HOST_MODULES!r}:
            raise ImportError("host module imported from cvx_core: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REPO)!r})
for m in {modules!r}:
    importlib.import_module("cvx_core." + m)
print("ok", len({modules!r}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def test_tests_import_the_pack_one_way() -> None:
    """Tests and the tools around the pack (bench, evaluation, scripts, devnodes) reach the pack only as
    ``customvideox.*``, the module objects the host's nodes use: no top-level ``cvx_core``/``cvx_host`` import.
    Tests also use no second loader (conftest registers the package once) and make no ``sys.path`` edits."""
    bad = []
    for path in sorted(p for d in ("tests", "bench", "evaluation", "scripts", "devnodes")
                       for p in (REPO / d).rglob("*.py")):
        if path.name == "test_layers.py":
            continue
        in_tests = path.relative_to(REPO).parts[0] == "tests"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            s = line.strip()
            top_level = s.startswith(("from cvx_core", "import cvx_core", "from cvx_host", "import cvx_host"))
            second_route = in_tests and (("pack_module(" in s and path.name != "conftest.py") or "host.pack(" in s
                                         or s.startswith("sys.path.insert"))
            if top_level or second_route:
                bad.append(f"{path.relative_to(REPO)}:{n}: {s}")
    assert not bad, "\n".join(bad)
