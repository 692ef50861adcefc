"""Radamsa-mutated requests against a real worker: nothing a client sends may hurt it.

An outside mutator (radamsa, through pyradamsa) turns a small corpus of valid requests
(GET, uploads with a length and chunked, pipelines, an h2c upgrade, trailers; no
websocket handshake: the echo app refuses websockets, so uvicorn's websocket protocol
answers its mutations 500 for the app, not for the bytes) into malformed
ones with a fixed seed, so a run is repeatable. Each case is one connection: the bytes,
then a half-close, then everything the server writes until it closes. The oracle:

- every byte written parses with h11 as a strict client (responses in sequence; a close
  in the middle of a body is a cut, not a malformed byte);
- no 500, 502 or 504 for a client's bytes (501 and 505 are the RFC's refusals);
- the worker that answered is alive afterwards (same pids) and the master too.

    .venv/bin/python bench/radamsa.py --http fast --cases 9000 --seed 22 \
        --out bench/results/radamsa/fast.json

tests/test_radamsa.py runs the same harness with a small budget on both protocols.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pyradamsa

ROOT = Path(__file__).resolve().parent.parent
CORPUS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /echo?x=1&y=%41 HTTP/1.1\r\nHost: t\r\nUser-Agent: radamsa\r\nAccept: */*\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world",
    b"PUT /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n"
    b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /h2 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
]
FORBIDDEN = {500, 502, 504}  # a 5xx that would blame the server for a client's bytes
CASE_DEADLINE = 5.0


@dataclass
class Findings:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    cut: int = 0  # closed in the middle of a response body
    silent: int = 0  # closed with nothing written (an incomplete request at the half-close)
    malformed: list[dict[str, str]] = field(default_factory=list)
    forbidden: list[dict[str, str]] = field(default_factory=list)
    slow: list[dict[str, str]] = field(default_factory=list)  # no close within the deadline


def judge(raw: bytes) -> tuple[list[int], str]:
    """The statuses h11 reads from `raw` as a client, and how it ended: `closed`, `cut`, or
    `malformed: <h11's reason>`."""
    statuses: list[int] = []
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")  # the server closed
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as err:
            if "incomplete" in str(err) or "without sending complete" in str(err):
                return statuses, "cut"
            if "ConnectionClosed when role=SERVER and state=SEND_RESPONSE" in str(err):
                return statuses, "closed"  # closed before answering what it had: nothing
            return statuses, f"malformed: {err}"
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            statuses.append(event.status_code)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
            return statuses, "closed"
        elif isinstance(event, h11.EndOfMessage):
            if conn.their_state is h11.MUST_CLOSE or conn.our_state is h11.MUST_CLOSE:
                continue  # h11 then reports the close
            if not conn.trailing_data[0]:
                return statuses, "closed"  # nothing after this response but the close
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
            conn.send(h11.EndOfMessage())


def exchange(port: int, payload: bytes) -> tuple[bytes, bool]:
    """(what the server wrote, whether it closed within CASE_DEADLINE)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_DEADLINE) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # answer what you have, then close (RFC 9112 9.6)
        except OSError:
            pass  # it answered and closed before taking it all
        out = b""
        deadline = time.monotonic() + CASE_DEADLINE
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return out, True
            if not chunk:
                return out, True
            out += chunk
        return out, False


def run(port: int, cases: int, seed: int) -> Findings:
    radamsa = pyradamsa.Radamsa(seed=seed)
    found = Findings()
    for i in range(cases):
        payload = radamsa.fuzz(CORPUS[i % len(CORPUS)], seed=seed * 1_000_003 + i,
                               max_mut=4096)
        raw, closed = exchange(port, payload)
        found.cases += 1
        case = {"case": str(i), "sent": payload[:300].hex(), "got": raw[:300].hex()}
        if not closed:
            found.slow.append(case)
            continue
        statuses, ended = judge(raw)
        found.statuses.update(statuses)
        if ended.startswith("malformed"):
            found.malformed.append({**case, "why": ended})
        elif ended == "cut":
            found.cut += 1
        elif not statuses:
            found.silent += 1
        if FORBIDDEN & set(statuses):
            found.forbidden.append(case)
    return found


def start(http: str, workdir: Path, hc: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
           "PYTHONPATH": str(ROOT / "tests" / "apps")}
    proc = subprocess.Popen(
        [hc, "--app", "hc_echo:app", "--workers", "1", "--http", http,
         "--bind", f"127.0.0.1:{port}", "--metrics-bind", "off",
         "--runtime-dir", str(workdir / "run")],
        env=env, stdout=open(workdir / "hc.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"hello-cluster did not start: {(workdir / 'hc.log').read_text()[-500:]}")


def workers_of(master: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True,
                         check=False).stdout
    return {int(pid) for pid in out.split()}


def fuzz(http: str, cases: int, seed: int, hc: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start(http, Path(tmp), hc)
        try:
            before = workers_of(proc.pid)
            started = time.monotonic()
            found = run(port, cases, seed)
            elapsed = time.monotonic() - started
            after = workers_of(proc.pid)
            alive = proc.poll() is None
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return {"http": http, "seed": seed, "cases": found.cases, "seconds": round(elapsed, 1),
            "statuses": dict(sorted(found.statuses.items())), "cut": found.cut,
            "silent": found.silent, "malformed": found.malformed,
            "forbidden": found.forbidden, "slow": found.slow,
            "workers_unchanged": before == after and bool(before), "master_alive": alive,
            "radamsa": pyradamsa.__name__, "corpus": len(CORPUS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", choices=("fast", "uvicorn"), default="fast")
    parser.add_argument("--cases", type=int, default=9000)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--hc", default=str(Path(sys.executable).parent / "hello-cluster"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = fuzz(args.http, args.cases, args.seed, args.hc)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: v for k, v in report.items() if k not in ("malformed", "forbidden", "slow")}
    print(json.dumps({**summary, "malformed": len(report["malformed"]),
                      "forbidden": len(report["forbidden"]), "slow": len(report["slow"])}))
    bad = report["malformed"] or report["forbidden"] or report["slow"] \
        or not report["workers_unchanged"] or not report["master_alive"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
