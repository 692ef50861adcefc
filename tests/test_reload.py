"""--reload: a watcher child (never a thread of the master) sends SIGHUP when a watched file
changes; the rolling reload serves throughout; a syntax error is said once and the old
workers serve on; the watcher is reaped, restarted if it dies, and stopped with the master."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Load, alive, children, run_cli, wait_for
from hello_cluster.supervisor import reloader

VERSIONED = '''
VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": VERSION.encode()}})
'''


def watchers(c) -> list[int]:
    return [p for p in children(c.pid) if alive(p)
            and b"reload watcher" in Path(f"/proc/{p}/cmdline").read_bytes()]


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def served(c) -> bytes:
    return c.get()[2]


@pytest.mark.parametrize("preload", [False, True])
def test_a_saved_change_reloads_and_a_syntax_error_is_said_once(cluster, tmp_path,
                                                                preload) -> None:
    d = tmp_path / "app"
    d.mkdir()
    main = d / "main.py"
    main.write_text(VERSIONED.format(version="one"))
    (d / "notes.txt").write_text("not watched\n")
    c = cluster("--workers", "2", "--app", "main:app", "--app-dir", str(d), "--reload",
                *(["--preload"] if preload else []), workers=2)
    wait_for(lambda: "--reload: watching" in c.log and bool(watchers(c)), 10, what="the watcher")
    assert threads(c.pid) == 1, "the master stays single-threaded"
    assert served(c) == b"one"
    with Load(c.port, max_seconds=30) as load:
        main.write_text(VERSIONED.format(version="two, longer"))  # a new size: no stale .pyc
        wait_for(lambda: served(c) == b"two, longer", 15, what="the reload to new code")
        # A file not matching --reload-include changes nothing.
        (d / "notes.txt").write_text("still not watched, and longer\n")
        # A syntax error: said once, no reload asked for, the old workers serve on.
        main.write_text(VERSIONED.format(version="three") + "def broken(:\n")
        wait_for(lambda: "invalid syntax" in c.log, 15, what="the syntax error")
        # Saved again, still broken: not said again (the watcher handles changes in order,
        # so the fix below is seen after it).
        main.write_text(VERSIONED.format(version="three") + "def broken(:\n  \n")
        time.sleep(0.3)
        assert served(c) == b"two, longer"
        main.write_text(VERSIONED.format(version="four, fixed"))
        wait_for(lambda: served(c) == b"four, fixed", 15, what="the fix to reload")
    assert load.failures == [], load.failures[:5]
    assert c.log.count("main.py:10: invalid syntax; not reloading") == 1, c.log
    assert c.log.count("reload: rolling replacement") == 2, c.log  # notes.txt: none
    [watcher] = watchers(c)
    c.signal(signal.SIGTERM)
    assert c.wait_exit(20) == 0
    assert not alive(watcher), "the watcher stops with the master"
    assert "watcher pid" not in c.log  # stopped, not 'ended' and restarted


def test_a_dead_watcher_is_reaped_and_restarted(cluster, tmp_path) -> None:
    (tmp_path / "main.py").write_text(VERSIONED.format(version="one"))
    c = cluster("--workers", "1", "--app", "main:app", "--app-dir", str(tmp_path), "--reload",
                workers=1)
    wait_for(lambda: len(watchers(c)) == 1, 10, what="the watcher")
    [first] = watchers(c)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: (now := watchers(c)) != [first] and len(now) == 1, 10,
             what="a new watcher")
    assert f"--reload: watcher pid {first} ended (killed by SIGKILL)" in c.log
    assert not alive(first)  # reaped, not a zombie
    # Saved once the new watcher says it watches (before that its watch may not be set up).
    [second] = watchers(c)
    wait_for(lambda: f"[{second}] reloader INFO --reload: watching" in c.log, 10,
             what="the new watcher's watch")
    (tmp_path / "main.py").write_text(VERSIONED.format(version="two, new"))
    wait_for(lambda: served(c) == b"two, new", 15, what="the new watcher's reload")


def test_reload_options_without_reload_are_refused() -> None:
    proc = run_cli("--reload-exclude", "tests")
    assert proc.returncode == 2
    assert "--reload-include/--reload-exclude need --reload" in proc.stderr
    proc = run_cli("--reload", "--reload-include", "/abs/*.py")
    assert proc.returncode == 2 and "is not a pattern relative to --app-dir" in proc.stderr


@pytest.mark.parametrize(("path", "include", "exclude", "expected"), [
    ("main.py", ["*.py"], [], True),
    ("pkg/deep/mod.py", ["*.py"], [], True),
    ("notes.txt", ["*.py"], [], False),
    ("templates/index.html", ["*.py", "templates/*.html"], [], True),
    ("tests/test_x.py", ["*.py"], ["tests"], False),
    ("pkg/tests/test_x.py", ["*.py"], ["tests"], False),
    ("pkg/mod_test.py", ["*.py"], ["*_test.py"], False),
    ("__pycache__/main.cpython-311.pyc", ["*"], [], False),
    (".venv/lib/site.py", ["*.py"], [], False),
    ("../outside.py", ["*.py"], [], False),
])
def test_which_changes_reload(path, include, exclude, expected) -> None:
    assert reloader.wanted(f"/srv/app/{path}", "/srv/app", include, exclude) is expected


def test_broken_files_are_said_once_and_forgotten_when_fixed(tmp_path) -> None:
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text("x = (\n")
    good.write_text("x = 1\n")
    broken = reloader.Broken()
    first = broken.update([str(bad), str(good)], str(tmp_path))
    assert first is not None and first.startswith("bad.py:1: ")
    assert broken.update([str(bad)], str(tmp_path)) is None  # the same error: not news
    bad.write_text("x = 2\n")
    assert broken.update([str(bad)], str(tmp_path)) is None and not broken.files
