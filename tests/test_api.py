"""`hello_cluster.run(app, **options)` (issue 24, item 4): the CLI by another door."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import clean_env, free_port, http_get, wait_for
from hello_cluster.api import OptionError, argv_for


def test_keywords_become_the_same_flags() -> None:
    assert argv_for("main:app", {"workers": 4, "max_requests": 1000, "preload": True,
                                 "request_metrics": False, "bind": ["a:1", "unix:/s"],
                                 "graceful_timeout": "20s", "user": None}) == [
        "--app", "main:app", "--workers", "4", "--max-requests", "1000", "--preload",
        "--no-request-metrics", "--bind", "a:1", "--bind", "unix:/s",
        "--graceful-timeout", "20s"]
    assert argv_for("m:a", {"bind": "127.0.0.1:8085"}) == ["--app", "m:a", "--bind",
                                                           "127.0.0.1:8085"]


@pytest.mark.parametrize(("app", "options", "words"), [
    (object(), {}, ["must be a 'module:attr' string", "object"]),
    ("m:a", {"wrokers": 2}, ["no option 'wrokers'", "did you mean workers"]),
    ("m:a", {"preload": "yes"}, ["preload takes True or False"]),
    ("m:a", {"workers": True}, ["workers takes a value"]),
    ("m:a", {"workers": [1, 2]}, ["takes one value, not a list"]),
    ("m:a", {"app": "x:y"}, ["no option 'app'"]),
])
def test_mistakes_raise_before_anything_starts(app: object, options: dict[str, object],
                                               words: list[str]) -> None:
    with pytest.raises(OptionError) as caught:
        argv_for(app, options)
    for word in words:
        assert word in str(caught.value)


def run_script(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], env=clean_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_run_serves_and_returns_the_exit_status(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    (tmp_path / "main.py").write_text(textwrap.dedent(f"""
        import sys

        import hello_cluster

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({{"type": "http.response.start", "status": 200, "headers": []}})
            await send({{"type": "http.response.body", "body": b"from main"}})

        if __name__ == "__main__":
            sys.exit(hello_cluster.run("main:app", workers=2, bind=["127.0.0.1:{port}"],
                                       metrics_bind="127.0.0.1:{metrics}"))
        """))
    proc = subprocess.Popen([sys.executable, "main.py"], env=clean_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and http_get(port, "/", timeout=1)[0] == 200, 20,
                 what="hello_cluster.run to serve")
        assert http_get(port, "/")[2] == b"from main"
        assert http_get(metrics, "/readyz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        out = proc.stdout.read()
    assert "Traceback" not in out, out


def test_a_bad_value_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_script(tmp_path, """
        import sys
        import hello_cluster
        sys.exit(hello_cluster.run("main:app", workers="many"))
        """)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    assert out.strip().count("\n") == 0 and "--workers" in out and "Traceback" not in out
