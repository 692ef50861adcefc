"""The migration guides' worked examples, as the docs print them: docs/from-gunicorn.md,
from-uvicorn.md and from-pm2.md. Each block marked `<!-- worked example: NAME -->` is written
out as NAME, loaded with `hello-cluster config --config`, and served by a real master."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, need_command, run_cli
from hello_cluster.config import OPTIONS, load_config

DOCS = ROOT / "docs"
BLOCK = re.compile(r"<!-- worked example: (?P<name>[^>]+?) -->\n```[a-z]*\n(?P<body>.*?)```",
                   re.DOTALL)
FLAGS = {o.flag for o in OPTIONS} | {f"--no-{o.name}" for o in OPTIONS}


def examples(page: str) -> dict[str, str]:
    found = {m["name"]: m["body"] for m in BLOCK.finditer((DOCS / page).read_text())}
    assert found, f"{page} has no worked example"
    return found


def write_out(page: str, where: Path, names: list[str]) -> dict[str, str]:
    blocks = examples(page)
    where.mkdir(exist_ok=True)
    for name in names:
        (where / name).write_text(blocks[name])
    return blocks


def command(text: str) -> list[str]:
    """The argv of a shell block's one command (continuation lines joined)."""
    return shlex.split(text.replace("\\\n", " "))


def check_config(path: Path, cwd: Path, *expected: str) -> None:
    proc = run_cli("config", "--config", str(path), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    for line in expected:
        assert line in proc.stdout, (line, proc.stdout)


@pytest.mark.parametrize("page", ["from-gunicorn.md", "from-uvicorn.md"])
def test_every_flag_the_guides_name_is_an_option(page) -> None:
    """The hello-cluster column of the tables names only real flags."""
    text = (DOCS / page).read_text()
    named = set()
    for row in text.splitlines():
        cells = row.split(" | ")
        if row.startswith("| ") and len(cells) >= 3:
            named |= set(re.findall(r"--[a-z][a-z0-9-]*", cells[1]))
    assert named and named <= FLAGS, sorted(named - FLAGS)


def test_from_gunicorn_the_conf_file_and_hooks_serve(cluster, tmp_path) -> None:
    app = tmp_path / "app"
    write_out("from-gunicorn.md", app, ["hello-cluster.toml", "hooks.py", "main.py"])
    toml = app / "hello-cluster.toml"
    check_config(toml, app, 'hooks = "hooks"  # --config', "preload = true  # --config",
                 "max-requests-jitter = 100  # --config", "wsgi-threads = 8  # --config")
    # The file's bind is for production; the test's loopback --bind flag wins over it.
    c = cluster("--config", str(toml), cwd=app)
    status, _, body = c.get()
    assert status == 200 and body.startswith(b"hello from pid "), body


def test_from_uvicorn_the_command_and_the_file_agree_and_serve(cluster, tmp_path) -> None:
    app = tmp_path / "app"
    blocks = write_out("from-uvicorn.md", app, ["hello-cluster.toml", "main.py"])
    uvicorn_argv = command(blocks["uvicorn command"])
    ours = command(blocks["hello-cluster command"])
    assert uvicorn_argv[0] == "uvicorn" and ours[0] == "hello-cluster"
    table = (DOCS / "from-uvicorn.md").read_text().split("## Every option", 1)[1]
    for flag in (a for a in uvicorn_argv if a.startswith("--")):
        assert f"`{flag}" in table, f"{flag} is not in the uvicorn table"
    from_file = load_config(["--config", str(app / "hello-cluster.toml"),
                             "--app-dir", str(app)], {})
    from_flags = load_config([*ours[1:], "--app-dir", str(app)], {})
    assert from_flags == type(from_file)(**{**from_file.__dict__, "config": None})
    c = cluster("--config", str(app / "hello-cluster.toml"), cwd=app)
    status, _, body = c.get("/orders")
    assert status == 200 and body == b"root_path=/api path=/api/orders\n", body


def test_from_pm2_the_unit_verifies_and_the_file_serves(cluster, tmp_path) -> None:
    app = tmp_path / "app"
    blocks = write_out("from-pm2.md", app, ["api.toml", "main.py"])
    toml = app / "api.toml"
    check_config(toml, app, 'max-worker-memory = 314572800  # --config',
                 "max-worker-lifetime = 86400.0  # --config", "crash-loop-limit = 10  # --config")
    c = cluster("--config", str(toml), cwd=app)
    status, _, body = c.get()
    assert (status, body) == (200, b"api\n")
    unit = blocks["api.service"]
    assert "ExecStart=/srv/api/.venv/bin/hello-cluster --config /etc/hello-cluster/api.toml" \
        in unit
    analyze = need_command("systemd-analyze", "systemd")
    units = tmp_path / "units"
    units.mkdir()
    (units / "api.service").write_text(
        unit.replace("/srv/api/.venv/bin/hello-cluster", str(BIN))
            .replace("/etc/hello-cluster/api.toml", str(toml))
            .replace("WorkingDirectory=/srv/api", f"WorkingDirectory={app}"))
    result = subprocess.run([analyze, "verify", "api.service"], cwd=units, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
