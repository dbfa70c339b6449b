"""The import contracts of pyproject.toml's [tool.importlinter] (import-linter): no circles in the core or a domain,
domains independent of each other and of the CLI, checkpoint I/O below everything. The package is assembled as a
wheel lays it out (src/polyformer with domains/ as polyformer/domains), since import-linter reads files from the
package's folder and the editable install maps the domains from elsewhere."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def assemble(folder: Path) -> Path:
    package = folder / "polyformer"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src" / "polyformer", package, ignore=ignore)
    shutil.copytree(ROOT / "domains", package / "domains", ignore=ignore)
    return folder


def lint(folder: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(config), "--no-cache"], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(folder)}, timeout=120)


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    if not LINT.is_file():
        pytest.skip(f"import-linter is not installed ({LINT} missing): pip install -e '.[dev]'")
    return assemble(tmp_path_factory.mktemp("package"))


def test_import_contracts_hold(assembled):
    result = lint(assembled, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_a_planted_circle_breaks_the_contract(tmp_path, assembled):
    """The contract is not vacuous: checkpoint.py importing training.py (which imports it) is caught and named."""
    planted = tmp_path / "planted"
    shutil.copytree(assembled, planted)
    checkpoint = planted / "polyformer" / "checkpoint.py"
    checkpoint.write_text(checkpoint.read_text() + "\n\ndef _planted():\n    from polyformer.training import PolyformerTask\n")
    result = lint(planted, ROOT / "pyproject.toml")
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and ".checkpoint -> .training" in result.stdout.replace("polyformer", "")
