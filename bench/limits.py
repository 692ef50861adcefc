"""What the app port's limits hold in memory, measured (the README's "Limits" figures).

For hello-cluster (one worker) and plain uvicorn serving tests/apps/hc_echo.py:
- pipeline: a client streams pipelined GETs for a few seconds and reads the answers; the
  serving process's RSS before and after, and how many answers came back;
- body: a client pushes a large body at a request whose app has not read it yet (it
  sleeps first); the serving process's RSS before and after;
- idle: RSS per connection that sends nothing, over 900 such connections.

Run with hello-cluster's venv: `.venv/bin/python bench/limits.py [--seconds 8]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import Proc, free_port, rss_mb

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def start(kind: str, tmp: Path) -> tuple[Proc, int, Callable[[], int]]:
    """The server, its port, and a function giving the pid that serves (the worker)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "apps")}
    if kind == "hello-cluster":
        argv = [str(BIN / "hello-cluster"), "--workers", "1", "--app", "hc_echo:app",
                "--bind", f"127.0.0.1:{port}", "--metrics-bind", "off"]
    else:
        argv = [str(BIN / "python"), "-m", "uvicorn", "hc_echo:app", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]
    proc = Proc(argv, env, tmp / f"{kind}.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # answering, not just bound (the master binds first)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            time.sleep(0.1)

    def server_pid() -> int:
        if kind != "hello-cluster":
            return proc.pid
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        return int(kids[0])

    return proc, port, server_pid


def rss(pid: int) -> float:
    return rss_mb(pid) or 0.0


def pipeline(port: int, pid: int, seconds: float) -> str:
    before = rss(pid)
    answered = [0]
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        def read() -> None:
            tail = b""
            try:
                while data := s.recv(1 << 20):
                    answered[0] += (tail + data).count(b"HTTP/1.1 200")
                    tail = data[-11:]
            except OSError:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        burst = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 10_000
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += s.send(burst)
            except TimeoutError:
                pass
        after = rss(pid)
        s.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=5)
    return (f"pipeline for {seconds:g} s: {sent // 18} requests sent, {answered[0]} answered, "
            f"RSS {before:.0f} -> {after:.0f} MiB")


def body(port: int, pid: int, seconds: float) -> str:
    before = rss(pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"POST /slow?s=%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                  % (int(seconds) + 2, 1 << 30))
        chunk = b"x" * (1 << 20)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
            except TimeoutError:
                pass
        after = rss(pid)
    return (f"unread body for {seconds:g} s: {sent >> 20} MiB accepted by the socket, "
            f"RSS {before:.0f} -> {after:.0f} MiB")


def idle(port: int, pid: int, count: int = 900) -> str:
    before = rss(pid)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    for s in socks:  # a head begun: under --defer-accept a connection that sent nothing
        s.sendall(b"G")  # would still be with the kernel, not the worker measured here
    time.sleep(1.0)
    after = rss(pid)
    for s in socks:
        s.close()
    return (f"{count} idle connections (one byte each): RSS {before:.1f} -> {after:.1f} MiB, "
            f"{(after - before) * 1024 / count:.1f} KiB each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"hc-bench-limits-{os.getpid()}"
    for kind in ("hello-cluster", "uvicorn"):
        for step in ("pipeline", "body", "idle"):
            proc, port, server_pid = start(kind, tmp)  # a fresh server for each figure
            try:
                pid = server_pid()
                if step == "pipeline":
                    line = pipeline(port, pid, args.seconds)
                elif step == "body":
                    line = body(port, pid, min(args.seconds, 5.0))
                else:
                    line = idle(port, pid)
                print(f"{kind:14} {line}", flush=True)
            finally:
                proc.stop()


if __name__ == "__main__":
    main()
