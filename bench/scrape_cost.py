"""What one /metrics scrape and one /status request cost the master at 1, 32 and 128 workers.

Both are answered from the master's single-threaded supervision loop, so their cost is time
the loop spends away from supervision. For each pool size this starts hello-cluster on
loopback, sends a few requests per worker (so each worker has its metric files), then asks
for /metrics and /status `--reps` times each, one after the other, and reports:

- the master's CPU per answer (utime + stime from /proc/<master>/stat over all the reps,
  divided by the reps: what the loop paid, robust to a busy shared machine),
- the client-side wall time (median and worst), and the body size.

Run with hello-cluster's venv: `.venv/bin/python bench/scrape_cost.py [--workers 1,32,128]`.
The markdown table goes to stdout and to `bench/results/scrape-cost-<YYYY-MM-DD>.md`.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "hello-cluster"
TICKS = os.sysconf("SC_CLK_TCK")


def get(port: int, path: str) -> tuple[int, bytes]:
    return h.http_get(port, path, timeout=30)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_ready(metrics_port: int, workers: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hello-cluster exited {proc.returncode}")
        try:
            status, body = get(metrics_port, "/metrics")
            if status == 200 and f"hello_cluster_workers_ready {workers}.0" in body.decode():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{workers} workers not ready in 120 s")


def measure(binary: str, workers: int, reps: int) -> dict[str, float]:
    port, metrics_port = h.free_port(), h.free_port()
    with tempfile.TemporaryDirectory(prefix="hc-scrape-cost-") as tmp:
        log = open(Path(tmp) / "log", "wb")
        proc = subprocess.Popen([binary, "--workers", str(workers), "--bind",
                                 f"127.0.0.1:{port}", "--metrics-bind",
                                 f"127.0.0.1:{metrics_port}", "--runtime-dir", tmp],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(metrics_port, workers, proc)
            for _ in range(4 * workers):  # spread over the workers by the steering
                get(port, "/")
            time.sleep(0.5)  # workers flush their counts every 0.1 s
            out: dict[str, float] = {}
            for path in ("/metrics", "/status"):
                if get(metrics_port, path)[0] == 404:  # an older build: no /status
                    out.update({f"{path.strip('/')}_{k}": math.nan for k in (
                        "cpu_ms", "wall_ms", "wall_max_ms", "bytes")})
                    continue
                walls = []
                before = cpu_seconds(proc.pid)
                for _ in range(reps):
                    t = time.perf_counter()
                    status, body = get(metrics_port, path)
                    walls.append(time.perf_counter() - t)
                    assert status == 200, body[:200]
                cpu = cpu_seconds(proc.pid) - before
                key = path.strip("/")
                out[f"{key}_cpu_ms"] = cpu / reps * 1000
                out[f"{key}_wall_ms"] = statistics.median(walls) * 1000
                out[f"{key}_wall_max_ms"] = max(walls) * 1000
                out[f"{key}_bytes"] = len(body)
            return out
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,32,128")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--bin", default=str(BIN),
                        help="the hello-cluster to measure (e.g. an older build, to compare)")
    parser.add_argument("--out", default=f"scrape-cost-{time.strftime('%Y-%m-%d')}.md",
                        help="file name under bench/results/")
    args = parser.parse_args()
    sizes = [int(n) for n in args.workers.split(",")]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"`{' '.join(sys.argv)}` with {args.bin} on {os.cpu_count()} CPUs, {when}, "
             f"load average before {os.getloadavg()[0]:.2f}",
             "",
             "| workers | /metrics master CPU | /metrics wall (median, max) | /metrics size "
             "| /status master CPU | /status wall (median, max) | /status size |",
             "|---|---|---|---|---|---|---|"]
    for n in sizes:
        r = measure(args.bin, n, args.reps)
        lines.append(
            f"| {n} | {r['metrics_cpu_ms']:.2f} ms | {r['metrics_wall_ms']:.2f} ms, "
            f"{r['metrics_wall_max_ms']:.1f} ms | {r['metrics_bytes'] / 1024:.1f} KiB "
            + (f"| {r['status_cpu_ms']:.2f} ms | {r['status_wall_ms']:.2f} ms, "
               f"{r['status_wall_max_ms']:.1f} ms | {r['status_bytes'] / 1024:.1f} KiB |"
               if not math.isnan(r["status_cpu_ms"]) else "| no /status | | |"))
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    results = ROOT / "bench" / "results" / args.out
    results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
