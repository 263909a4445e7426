"""The package's seams: the core never imports a job package or the test fixtures, and nothing imports torch at
module level (it is an optional extra)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "m3jax"
JOBS = ("m3jax.embed", "m3jax.evaluate", "m3jax.train")


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


CORE = sorted(p for p in PKG.glob("*.py") if p.name not in ("cli.py", "__main__.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_imports_no_job_package_and_no_test_fixture(path):
    found = imports(path)
    assert not {m for m in found if m.startswith(JOBS)}, f"{path.name} imports a job package"
    if path.name != "testing.py":
        assert not {m for m in found if m.startswith("m3jax.testing")}, f"{path.name} imports m3jax.testing"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_level_torch(path):
    assert not {m for m in imports(path, top_level_only=True) if m.split(".")[0] == "torch"}


def test_cli_is_not_imported_by_the_library():
    for path in PKG.rglob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert "m3jax.cli" not in imports(path), path
