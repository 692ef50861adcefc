"""How --wsgi-threads changes one worker's throughput for a Flask app (the default's evidence).

Two views: `/` answers at once (CPU-bound: threads only contend for the GIL) and `/io` waits
10 ms as a database call would (threads overlap the waits). One worker, wrk with 64
keep-alive connections, a few seconds per point:

    .venv/bin/python bench/wsgi_threads.py [--seconds 4] [--threads 1,4,10,32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import harness as h

APP = '''
import time
from flask import Flask

app = Flask(__name__)

@app.get("/")
def hello():
    return "<h1>Hello Python!</h1><p>Hello Cluster!</p>"

@app.get("/io")
def io():
    time.sleep(0.01)  # a 10 ms database call
    return "done"
'''


def measure(port: int, path: str, seconds: float) -> h.WrkResult:
    argv = ["wrk", "-t1", "-c64", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s",
            f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    return h.parse_wrk(out)


def up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", default="1,4,10,32")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    binary = str(Path(sys.executable).parent / "hello-cluster")
    with tempfile.TemporaryDirectory(prefix="hc-wsgi-threads-") as tmp:
        Path(tmp, "flask_hello.py").write_text(APP)
        print("threads  hello rps  hello p99 ms  io(10ms) rps  io p99 ms")
        for threads in [int(t) for t in args.threads.split(",")]:
            port = h.free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("HELLO_CLUSTER_")}
            proc = h.Proc([binary, "--workers", "1", "--bind", f"127.0.0.1:{port}",
                           "--metrics-bind", "off", "--app", "flask_hello:app",
                           "--app-dir", tmp, "--wsgi-threads", str(threads)],
                          env, Path(tmp, f"log-{threads}"))
            try:
                deadline = time.monotonic() + 20
                while not up(port) and time.monotonic() < deadline:
                    time.sleep(0.1)
                measure(port, "/", 1)  # warm-up
                hello = measure(port, "/", args.seconds)
                io = measure(port, "/io", args.seconds)
            finally:
                proc.stop()
            print(f"{threads:7d}  {hello.rps or 0:9.0f}  {hello.p99_ms or 0:12.1f}  "
                  f"{io.rps or 0:12.0f}  {io.p99_ms or 0:9.1f}"
                  + ("  (errors)" if hello.failed or io.failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
