"""What a new user tripped over on 2026-12-02 (issue 21, item 8), each pinned by a test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import run_cli
from hello_cluster.config import parse_size
from hello_cluster.errors import AppLoadError, ConfigError
from hello_cluster.worker.loader import detect_interface, import_app


def test_a_factory_without_factory_names_the_flag(tmp_path: Path) -> None:
    """`--app fact:create_app` without --factory said "it takes 0 to 0 positional arguments"."""
    (tmp_path / "fact.py").write_text("def create_app():\n    return None\n")
    proc = run_cli("--bind", "127.0.0.1:0", "--workers", "1", "--app", "fact:create_app",
                   cwd=tmp_path, env={"PYTHONPATH": ""})
    assert proc.returncode == 4, proc.stderr
    assert "add --factory" in proc.stderr and "0 to 0" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_detect_interface_suggests_factory_for_zero_arguments() -> None:
    chosen, why = detect_interface(lambda: None)
    assert chosen is None and "--factory" in why


@pytest.mark.parametrize(("text", "where"), [
    ("def broken(:\n", "mod_syntax.py:1"),
    ("import nosuchmodule_for_sure\n", "mod_syntax.py:1"),
    ("x = 1\nraise RuntimeError('no')\n", "mod_syntax.py:2"),
])
def test_import_errors_name_the_app_file_not_importlib(tmp_path: Path, text: str,
                                                       where: str) -> None:
    """The `(<frozen importlib._bootstrap>:241)` suffix was noise: name the app's own line."""
    (tmp_path / "mod_syntax.py").write_text(text)
    sys.modules.pop("mod_syntax", None)
    with pytest.raises(AppLoadError) as caught:
        import_app("mod_syntax:app", str(tmp_path))
    message = str(caught.value)
    assert "<frozen" not in message and where in message, message
    sys.modules.pop("mod_syntax", None)


@pytest.mark.parametrize(("text", "size"), [
    ("300MB", 300 * 10**6), ("300M", 300 * 2**20), ("300MiB", 300 * 2**20),
    ("300Mi", 300 * 2**20), ("2GB", 2 * 10**9), ("2G", 2 * 2**30), ("64kb", 64_000)])
def test_si_and_iec_sizes_mean_what_they_say(text: str, size: int) -> None:
    """`--max-worker-memory 300MB` silently meant MiB; SI units are decimal now."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["300XB", "MB", "3 00M", "1.2.3G"])
def test_unknown_size_spellings_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_help_does_not_offer_a_flag_that_is_always_refused() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "--ssl-keyfile-password-file" in proc.stdout
    assert "--ssl-keyfile-password " not in proc.stdout.replace("\n", " ")
    refused = run_cli("--ssl-keyfile-password", "hunter2")
    assert refused.returncode == 2 and "--ssl-keyfile-password-file" in refused.stderr
