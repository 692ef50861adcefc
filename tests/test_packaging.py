"""The wheel users install: the version written once, py.typed shipped, the license in it,
no test-only dependency at run time (issue 21, item 6)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import hello_cluster
from conftest import ROOT


def test_the_wheel_carries_version_types_and_license(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = tmp_path.glob("hello_cluster-*.whl")
    assert wheel.name.startswith(f"hello_cluster-{hello_cluster.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "hello_cluster/py.typed" in names
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE")
                   for n in names), names
    assert f"Version: {hello_cluster.__version__}\n" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not any("h11" in r for r in runtime), runtime
    assert any("h11" in r for r in requires), "h11 is a test extra"


def test_the_version_is_written_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion = \"" not in pyproject
    assert f'__version__ = "{hello_cluster.__version__}"' in \
        (ROOT / "service/hello_cluster/__init__.py").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {hello_cluster.__version__}" in changelog
