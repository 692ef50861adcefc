"""What the hang forensics cost a worker: CPU per request and idle CPU (docs/observability.md).

One worker serving the hello page under `wrk -t1 -c32 -d5s`, per variant: the stall watch off
(`--stall-report-after 0`), the default (1 s watch), and `--request-timeout 30s`; with
`--base DIR`, also the code in DIR (e.g. `git archive <commit> service | tar -x -C DIR`),
before the feature. Worker CPU per request is read from /proc around the run, so it holds
on a shared machine where requests/s does not.

    .venv/bin/python bench/hang_cost.py [--rounds 3] [--idle] [--base /tmp/hc-base]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(service: Path, extra: list[str], port: int) -> subprocess.Popen[bytes]:
    code = (f"import sys; sys.path.insert(0, {str(service)!r}); "
            "from hello_cluster.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", code, "--bind", f"127.0.0.1:{port}",
                             "--metrics-bind", f"127.0.0.1:{port + 1000}", "--workers", "1",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.5)
    return proc


def worker_of(proc: subprocess.Popen[bytes]) -> int:
    return int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", action="store_true", help="idle CPU over 10 s instead")
    parser.add_argument("--base", type=Path, help="a checkout's service/ dir before the feature")
    args = parser.parse_args()
    here = ROOT / "service"
    variants = {"watch off": (here, ["--stall-report-after", "0"]),
                "default (watch 1s)": (here, []),
                "request-timeout 30s": (here, ["--request-timeout", "30s"])}
    if args.base is not None:
        variants["before"] = (args.base / "service", [])
    port = 28085
    for _ in range(args.rounds):
        for name, (service, extra) in variants.items():
            port += 1
            proc = start(service, extra, port)
            try:
                pid = worker_of(proc)
                before = cpu_seconds(pid)
                if args.idle:
                    time.sleep(10)
                    used = cpu_seconds(pid) - before
                    print(f"{name}: worker idle CPU {used / 10 * 100:.2f}% over 10 s")
                    continue
                out = subprocess.run(["wrk", "-t1", "-c32", "-d5s", f"http://127.0.0.1:{port}/"],
                                     capture_output=True, text=True, check=True).stdout
                used = cpu_seconds(pid) - before
                rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
                count = re.search(r"(\d+) requests in", out)
                assert rps and count, out
                print(f"{name}: {rps.group(1)} req/s, worker CPU "
                      f"{used / int(count.group(1)) * 1e6:.1f} us per request", flush=True)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    main()
