"""The package's seams: the core never imports a job package or the test fixtures; no job imports another job;
nothing imports JAX's internals (jax._src); nothing imports torch at module level (it is an optional extra)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "m3jax"
JOBS = ("m3jax.embed", "m3jax.evaluate", "m3jax.train")
# Core capabilities too big for one module: part of the core (the encode step and CorpusIndex use them), so held to
# its rules.
CORE_PACKAGES = ("m3jax.compact",)


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


CORE = sorted([p for p in PKG.glob("*.py") if p.name not in ("cli.py", "__main__.py")] +
              [p for pkg in CORE_PACKAGES for p in (PKG / pkg.split(".")[1]).glob("*.py")])


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
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


def test_the_job_and_core_packages_are_the_subpackages():
    """JOBS and CORE_PACKAGES list every subpackage, so the seams below cover each of them."""
    subpackages = {f"m3jax.{p.parent.name}" for p in PKG.glob("*/__init__.py")}
    assert subpackages == set(JOBS) | set(CORE_PACKAGES)


@pytest.mark.parametrize("job", JOBS)
def test_no_job_imports_another_job(job):
    others = tuple(j for j in JOBS if j != job)
    for path in sorted((PKG / job.split(".")[1]).rglob("*.py")):
        found = {m for m in imports(path) if m.startswith(others)}
        assert not found, f"{path.relative_to(ROOT)} ({job}) imports {sorted(found)}: shared code belongs in the core"


@pytest.mark.parametrize("folder", ["m3jax", "convert", "benchmarks", "tests"])
def test_nothing_imports_jax_internals(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        found = {m for m in imports(path) if m == "jax._src" or m.startswith("jax._src.")}
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}: use JAX's public API"


def test_the_seams_checks_see_nested_imports(tmp_path):
    """imports() finds an import inside a function body, where the seams are most often crossed."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from jax._src import distributed\n    import m3jax.train.loop\n")
    assert {"jax._src", "jax._src.distributed", "m3jax.train.loop"} <= imports(f)


def test_readme_opens_with_the_two_setup_commands_ci_runs():
    """README's first two bash blocks run the main job and the tests; the test one is .ci/run's command, verbatim."""
    import re

    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert blocks[0].endswith("m3jax demo") and blocks[0].startswith("python3 -m venv .venv")
    assert blocks[1] == ci[-1] and blocks[1].endswith("python -m pytest -q")
