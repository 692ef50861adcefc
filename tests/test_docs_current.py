"""docs/configuration.md's option table is what `make docs` writes from config.OPTIONS.

A default, an env name or a meaning is written once, in OPTIONS (issue 21); these tests fail,
saying "run make docs", when the page was not regenerated after an option changed, and prove
that the check notices a stale page and that a rewrite keeps the prose around the table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, clean_env
from hello_cluster.config import OPTIONS

TOOL = ROOT / "tools" / "gen_config_docs.py"
PAGE = ROOT / "docs" / "configuration.md"


def gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=clean_env(), timeout=60, check=False)


def test_configuration_page_is_current() -> None:
    proc = gen("--check")
    assert proc.returncode == 0, proc.stderr or "docs/configuration.md is stale: run make docs"


def test_a_stale_page_is_caught_and_rewritten_with_its_prose(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    current = PAGE.read_text()
    row = next(line for line in current.splitlines() if "`HELLO_CLUSTER_WORKERS`" in line)
    page.write_text(current.replace(row, row.replace("`auto`", "`4`", 1)))
    proc = gen("--check", "--page", str(page))
    assert proc.returncode == 1
    assert "is not current with config.OPTIONS: run make docs" in proc.stderr
    assert gen("--page", str(page)).returncode == 0
    assert page.read_text() == current


def test_every_option_has_one_row_with_its_env_and_default() -> None:
    rows = [line for line in PAGE.read_text().splitlines() if line.startswith("| ")]
    for opt in OPTIONS:
        mine = [r for r in rows if r.split(" | ")[1].startswith(f"`{opt.env}`")]
        assert len(mine) == 1, opt.env
        if opt.default and not opt.doc_default:
            assert f" | `{opt.default}` | " in mine[0], opt.name


def test_a_page_without_markers_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    page.write_text("# Configuration\n\nno table here\n")
    proc = gen("--check", "--page", str(page))
    assert proc.returncode == 2
    assert "the markers are missing" in proc.stderr
