"""--preload: one template imports the app, workers are forked from it and share its memory;
a reload loads new code through a new template; failures are said once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import TEST_APPS, Load, alive, children, run_cli, wait_for
from hello_cluster.supervisor import memory

MiB = 1024 * 1024
VERSIONED = '''
VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({{"type": "lifespan.startup.complete"}})
        await send({{"type": "lifespan.shutdown.complete"}})
        return
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": VERSION.encode()}})
'''


def templates(c) -> list[int]:
    return [p for p in children(c.pid) if alive(p)
            and "template" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def private_mib(pids: list[int]) -> list[float]:
    return [(memory.uss_bytes(p) or 0) / MiB for p in pids]


def test_workers_share_the_preloaded_app(cluster) -> None:
    """hc_heavy builds ~60 MB at import: each worker of a plain pool holds its own copy;
    forked from the template, a worker's private memory is a small fraction of it."""
    plain = cluster("--workers", "2", "--app", "hc_heavy:app", workers=2)
    plain_uss = private_mib(plain.workers())
    plain.kill_all()
    shared = cluster("--workers", "2", "--app", "hc_heavy:app", "--preload", workers=2)
    for _ in range(20):
        assert shared.get()[0] == 200
    shared_uss = private_mib([p for p in shared.workers() if p not in templates(shared)])
    assert len(shared_uss) == 2 and len(plain_uss) == 2
    assert min(plain_uss) > 40, plain_uss  # the app's objects, private to each
    assert max(shared_uss) < min(plain_uss) / 3, (shared_uss, plain_uss)


def test_a_reload_loads_new_code_and_respawns_fork_from_the_template(cluster, tmp_path) -> None:
    app_file = tmp_path / "versioned.py"
    app_file.write_text(VERSIONED.format(version="one"))
    c = cluster("--workers", "2", "--app", "versioned:app", "--preload", "--log-level", "debug",
                env={"PYTHONPATH": f"{tmp_path}:{TEST_APPS}"}, workers=2)
    assert c.get()[2] == b"one"
    [first_template] = templates(c)
    # A respawn is a fork of the template: no new import, and the worker is our child.
    victim = c.workers()[-1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in c.workers() and len(c.workers()) == 3, 10,
             what="the respawn")
    c.wait_ready(workers=2)
    assert templates(c) == [first_template]
    assert c.log.count("importing the app") == 1
    # New code, SIGHUP: a new template imports it; the old one is stopped.
    # (A new size too: a .pyc written in the same second is trusted on mtime and size.)
    app_file.write_text(VERSIONED.format(version="version two"))
    with Load(c.port, max_seconds=20) as load:
        c.signal(signal.SIGHUP)
        wait_for(lambda: c.log.count("ended (reload") == 2, 15, what="the reload")
        load.wait_more(20)  # and on, served by the new generation
    assert load.failures == [], load.failures[:5]
    wait_for(lambda: len(templates(c)) == 1 and templates(c) != [first_template], 5,
             what="the old template to stop")
    assert {c.get()[2] for _ in range(10)} == {b"version two"}


def test_broken_new_code_abandons_the_reload(cluster, tmp_path) -> None:
    app_file = tmp_path / "versioned.py"
    app_file.write_text(VERSIONED.format(version="good"))
    c = cluster("--workers", "2", "--app", "versioned:app", "--preload",
                env={"PYTHONPATH": f"{tmp_path}:{TEST_APPS}"}, workers=2)
    before = set(c.workers())
    app_file.write_text("raise RuntimeError('half-deployed')\n")
    c.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in c.log, 15, what="the reload to be abandoned")
    assert set(c.workers()) == before  # the old generation (template and workers) serves on
    assert {c.get()[2] for _ in range(5)} == {b"good"}
    [line] = [ln for ln in c.log.splitlines() if "reload failed" in ln]
    assert "half-deployed" in line and "Traceback" not in c.log


def test_a_replacement_template_that_cannot_import_backs_off(cluster, tmp_path) -> None:
    """The files broke after the pool served, then the template died: each replacement
    that fails the import waits out a growing backoff (decisions.judge_template_death)
    instead of a new template at once, and the workers serve on meanwhile."""
    app_file = tmp_path / "versioned.py"
    app_file.write_text(VERSIONED.format(version="good"))
    c = cluster("--workers", "2", "--app", "versioned:app", "--preload", "--log-level",
                "debug", "--backoff-initial", "1s",
                env={"PYTHONPATH": f"{tmp_path}:{TEST_APPS}"}, workers=2)
    [template] = templates(c)
    app_file.write_text("raise RuntimeError('half-deployed')\n")
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: "half-deployed" in c.log, 10, what="a failed replacement")
    started = c.log.count("importing the app for generation")
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # the window in which few attempts may happen
        assert c.get()[2] == b"good"
        time.sleep(0.2)
    # Backoff ceilings 1, 2, 4 s after the first failure: a handful of templates at most
    # in 3 s, where a template per failed import (milliseconds each) made dozens.
    attempts = c.log.count("importing the app for generation") - started
    assert attempts <= 4, attempts
    assert "could not import the app: --app versioned:app: importing versioned raised " \
           "RuntimeError: half-deployed" in c.log


def test_an_app_that_cannot_be_imported_fails_the_start_once() -> None:
    proc = run_cli("--preload", "--workers", "4", "--app", "hc_importerror:app",
                   "--metrics-bind", "off", "--bind", "127.0.0.1:0")
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in lines if "hc_importerror" in ln]
    assert len(errors) == 1 and len(lines) <= 3, lines  # said once, by the exit line


def test_a_dead_template_is_replaced_and_nothing_outlives_the_master(cluster) -> None:
    c = cluster("--workers", "2", "--preload", workers=2)
    [template] = templates(c)
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: templates(c) not in ([], [template]), 10, what="a new template")
    victim = c.workers()[-1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in c.workers(), 5, what="the worker to go")
    c.wait_ready(workers=2)
    everyone = children(c.pid)
    os.kill(c.pid, signal.SIGKILL)  # a crashed master takes template and workers along
    wait_for(lambda: not any(alive(p) for p in everyone), 10, what="no orphan left")


def test_a_template_stuck_importing_is_stopped_by_the_startup_timeout() -> None:
    proc = run_cli("--preload", "--workers", "2", "--app", "hc_slowimport:app",
                   "--startup-timeout", "1s", "--metrics-bind", "off", "--bind", "127.0.0.1:0",
                   env={"HC_SLOW_IMPORT_SECONDS": "30"})
    assert proc.returncode == 4, proc.stderr
    assert "did not import the app within 1s (--startup-timeout)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3 and "Traceback" not in proc.stderr
