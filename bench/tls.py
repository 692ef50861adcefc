"""What TLS and the access log cost: hello-cluster against uvicorn with the same certificate.

    .venv/bin/python bench/tls.py [--workers 2] [--reps 3] [--duration 5] [--out DIR]

Contenders (N workers each, 127.0.0.1, the same hello page):

- hc / uvicorn: plain HTTP, no access log (hello-cluster's default; `--no-access-log`);
- hc-access / uvicorn-access: plain HTTP with the access log on, written to a file (stderr
  redirected), as under a process manager that collects stderr;
- hc-tls / uvicorn-tls: HTTPS with one P-256 certificate made by openssl for the run.

uvicorn is the project venv's own (the engine hello-cluster's workers run), so the
difference is the supervisor and its middleware, not the uvicorn version. Each round
visits every contender back to back in a rotated order with `wrk -t1 -c64` keep-alive and,
for the TLS pair, `Connection: close` (a full handshake per request); the order is rotated
each round and reversed every other round. Ratios are taken within a round and the
median over rounds is reported; every sample is in the JSON. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import peers  # noqa: E402

RESULTS = peers.BENCH / "results" / "tls"
WORK = peers.WORK / "tls"
HC = str(peers.MAIN_BIN / "hello-cluster")
UVICORN = str(peers.MAIN_BIN / "uvicorn")
PAIRS = (("hc", "uvicorn"), ("hc-access", "uvicorn-access"), ("hc-tls", "uvicorn-tls"))


def make_certificate(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.pem", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def commands(workers: int, cert: Path, key: Path, ports: dict[str, int]) -> dict[str, list[str]]:
    n = str(workers)
    tls = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]

    def hc(name: str, *extra: str) -> list[str]:
        return [HC, "--bind", f"127.0.0.1:{ports[name]}", "--workers", n, "--metrics-bind",
                "off", *extra]

    def uv(name: str, *extra: str) -> list[str]:
        return [UVICORN, "peer_app:app", "--host", "127.0.0.1", "--port", str(ports[name]),
                "--workers", n, "--loop", "uvloop", "--http", "httptools",
                "--no-server-header", *extra]

    return {
        "hc": hc("hc"),
        "uvicorn": uv("uvicorn", "--no-access-log"),
        "hc-access": hc("hc-access", "--access-log"),
        "uvicorn-access": uv("uvicorn-access"),
        "hc-tls": hc("hc-tls", *tls),
        "uvicorn-tls": uv("uvicorn-tls", "--no-access-log", *tls),
    }


def answers(port: int, tls: bool) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            sock: socket.socket = raw
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE  # nosec B501 -- our own throwaway cert
                sock = ctx.wrap_socket(raw)
            sock.sendall(h.REQUEST)
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wrk(port: int, duration: float, tls: bool, close: bool) -> h.WrkResult:
    argv = h.wrk_argv(port, duration, close)
    if tls:
        argv[-1] = argv[-1].replace("http://", "https://")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    return h.parse_wrk(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    cert, key = make_certificate(WORK)
    ports = {name: h.free_port() for pair in PAIRS for name in pair}
    argvs = commands(args.workers, cert, key, ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELLO_CLUSTER_")}
    env.update(peers.peer_env())
    procs = {name: h.Proc(cmd, env, WORK / "logs" / f"{name}.log") for name, cmd in argvs.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {"keepalive": [], "close": []}
                                                  for n in argvs}
    failed: dict[str, int] = dict.fromkeys(argvs, 0)
    try:
        for name in argvs:
            deadline = time.monotonic() + 30
            while not answers(ports[name], "tls" in name):
                if time.monotonic() > deadline or not procs[name].alive():
                    sys.exit(f"bench: {name} did not start; see {WORK / 'logs'}")
                time.sleep(0.1)
            wrk(ports[name], 1, "tls" in name, False)  # warm-up, discarded
        names = list(argvs)
        for rep in range(args.reps):
            # Rotated each round and reversed every other round, so a machine getting
            # busier or quieter during a round does not favour whoever comes later.
            order = names[rep % len(names):] + names[:rep % len(names)]
            if rep % 2:
                order.reverse()
            for name in order:
                tls = "tls" in name
                for mode in ("keepalive", "close") if tls else ("keepalive",):
                    r = wrk(ports[name], args.duration, tls, mode == "close")
                    samples[name][mode].append(r.rps)
                    failed[name] += r.failed
                    print(f"round {rep + 1} {name:15} {mode:9} {r.rps:10,.0f} req/s "
                          f"p99 {r.p99_ms} ms failed {r.failed}", flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
        access_log_bytes = {}
        for n in argvs:
            if "access" in n:  # tens of MB per run: keep the size, not the file
                log = WORK / "logs" / f"{n}.log"
                access_log_bytes[n] = log.stat().st_size
                log.unlink()
    rows = []
    for subject, baseline in PAIRS:
        for mode in ("keepalive", "close"):
            ours, theirs = samples[subject][mode], samples[baseline][mode]
            if not ours:
                continue
            rows.append({"pair": f"{subject} vs {baseline}", "mode": mode,
                         "subject_rps": statistics.median(ours),
                         "baseline_rps": statistics.median(theirs),
                         "ratio": statistics.median(a / b for a, b in zip(ours, theirs,
                                                                          strict=True))})
    costs = {
        "hc access log on/off": statistics.median(
            a / b for a, b in zip(samples["hc-access"]["keepalive"], samples["hc"]["keepalive"],
                                  strict=True)),
        "uvicorn access log on/off": statistics.median(
            a / b for a, b in zip(samples["uvicorn-access"]["keepalive"],
                                  samples["uvicorn"]["keepalive"], strict=True)),
        "hc TLS/plain (keep-alive)": statistics.median(
            a / b for a, b in zip(samples["hc-tls"]["keepalive"], samples["hc"]["keepalive"],
                                  strict=True)),
        "uvicorn TLS/plain (keep-alive)": statistics.median(
            a / b for a, b in zip(samples["uvicorn-tls"]["keepalive"],
                                  samples["uvicorn"]["keepalive"], strict=True)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    command = "bench/tls.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "command": command.strip(), "when": stamp, "workers": args.workers,
        "reps": args.reps, "duration": args.duration, "cpus": os.cpu_count(),
        "load_before": os.getloadavg(), "openssl": ssl.OPENSSL_VERSION,
        "argv": argvs, "samples": samples, "failed": failed, "rows": rows, "costs": costs,
        "access_log_bytes": access_log_bytes}
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# TLS and access-log costs, {stamp}", "",
             f"`{result['command']}` on {os.cpu_count()} CPUs, {args.workers} workers each, "
             f"{args.reps} rounds of {args.duration:g} s `wrk -t1 -c64` runs, medians. "
             f"{ssl.OPENSSL_VERSION}, P-256 certificate. Shared machine: other developers' "
             f"tests ran meanwhile (load average {os.getloadavg()[0]:.1f} at the end).", "",
             "| pair | mode | hello-cluster req/s | uvicorn req/s | ratio (median of rounds) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['pair']} | {row['mode']} | {row['subject_rps']:,.0f} | "
                     f"{row['baseline_rps']:,.0f} | {row['ratio']:.2f}x |")
    lines += ["", "| cost | ratio |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in costs.items()]
    lines += ["", f"Failed requests (wrk socket errors + non-2xx): {failed}"]
    (out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
