"""`hello-cluster dump`: every live worker's stacks and asyncio tasks, without stopping it.

Stacks show code, so they never go near the metrics port (unauthenticated, on all
interfaces by default). The command finds the master the way the master left it: a
`stacks-<master pid>` directory in its runtime dir (mode 0700; one 0600 file pair per live
worker, named by slot and pid: system/stackdump.py). It signals each worker's main thread
itself, so only root and the user the workers run as can take a dump: the same people who
could attach a debugger. The runtime dir is `--runtime-dir`, else HELLO_CLUSTER_RUNTIME_DIR
or RUNTIME_DIRECTORY as the server reads them, else the private `hello-cluster-*` temp
dirs of the calling user.

For each worker: faulthandler's stacks (every thread, answered even while the loop is
stuck in a C call), then the event loop's pending tasks with the coroutine each one waits
in. Only a turning loop can list its tasks: a blocked one is said to be blocked.

Exit status: 0 dumped, 1 `--slot N` has no live worker, 2 bad arguments, 3 the master cannot
be reached (no runtime dir or live master found, or not permitted: one line on stderr).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from hello_cluster.system import stackdump

EXIT_OK, EXIT_NO_SLOT, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
STACK_WAIT = 2.0  # faulthandler answers in microseconds once the worker is scheduled
TASKS_WAIT = 1.0  # a loop that has not answered by then is blocked (or badly lagging)


class Unreachable(Exception):
    pass


@dataclass
class WorkerDump:
    slot: int  # 0-based
    pid: int
    stacks_path: str
    tasks_path: str
    stack: stackdump.StackRequest | None = None
    tasks_offset: int = -1  # -1: its loop was not asked (no tasks file yet)
    asked_at: float = 0.0
    threads: list[stackdump.ThreadStack] = field(default_factory=list)
    tasks: dict[str, Any] | None = None


def _alive_master(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hello-cluster" in f.read()
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def runtime_dirs(given: str | None, env: Mapping[str, str]) -> list[str]:
    if given:
        return [given]
    for name in ("HELLO_CLUSTER_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        value = env.get(name, "").split(":")[0]
        if value:
            return [value]
    uid = os.getuid()
    found = []
    for path in sorted(glob.glob(os.path.join(tempfile.gettempdir(), "hello-cluster-*"))):
        try:
            if os.stat(path).st_uid == uid and os.path.isdir(path):
                found.append(path)
        except OSError:
            continue
    return found


def find_masters(dirs: Sequence[str]) -> list[tuple[int, str]]:
    """(master pid, its stacks dir) of every live master in `dirs`."""
    masters = []
    denied = None
    for runtime in dirs:
        try:
            names = os.listdir(runtime)
        except PermissionError:
            denied = runtime
            continue
        except OSError:
            continue
        for name in sorted(names):
            suffix = name[len(stackdump.DIR_PREFIX):]
            if name.startswith(stackdump.DIR_PREFIX) and suffix.isdigit() \
                    and _alive_master(int(suffix)):
                masters.append((int(suffix), os.path.join(runtime, name)))
    if not masters:
        if denied is not None:
            raise Unreachable(f"cannot read {denied}: permission denied; run as root or as "
                              "the user the workers run as (--user)")
        where = ", ".join(dirs) if dirs else f"{tempfile.gettempdir()}/hello-cluster-*"
        raise Unreachable(f"no running hello-cluster found in {where}; is it running? pass "
                          "its --runtime-dir DIR")
    return masters


def workers_of(directory: str, slot: int | None) -> list[WorkerDump]:
    try:
        names = os.listdir(directory)
    except PermissionError:
        raise Unreachable(f"cannot read {directory}: permission denied; run as root or as "
                          "the user the workers run as (--user)") from None
    except OSError as err:
        raise Unreachable(f"cannot read {directory}: {err.strerror}") from None
    found = []
    for name in names:
        parsed = stackdump.parse_name(name)
        if parsed is None or parsed[2] != "stacks" or not _pid_alive(parsed[1]):
            continue
        if slot is not None and parsed[0] != slot:
            continue
        found.append(WorkerDump(parsed[0], parsed[1], os.path.join(directory, name),
                                stackdump.file_path(directory, parsed[0], parsed[1], "tasks")))
    return sorted(found, key=lambda w: (w.slot, w.pid))


def ask(workers: Sequence[WorkerDump]) -> None:
    """Signal every worker at once, then wait for all: the slowest bounds the whole dump."""
    for w in workers:
        w.asked_at = time.monotonic()
        try:
            w.stack = stackdump.StackRequest.send(w.stacks_path, w.pid, STACK_WAIT)
            if os.path.exists(w.tasks_path):
                w.tasks_offset = os.stat(w.tasks_path).st_size
                stackdump.signal_main_thread(w.pid, stackdump.TASKS_SIGNAL)
        except PermissionError:
            raise Unreachable(f"not permitted to signal worker pid {w.pid}; run as root or "
                              "as the user the workers run as (--user)") from None
        except OSError:
            continue  # it just exited
    deadline = time.monotonic() + max(STACK_WAIT, TASKS_WAIT)
    while True:
        now = time.monotonic()
        pending = False
        for w in workers:
            if w.tasks is None and w.tasks_offset >= 0 and now - w.asked_at < TASKS_WAIT:
                w.tasks = _tasks_answer(w)
                pending = pending or w.tasks is None
            if w.stack is not None and not (w.stack.done() or w.stack.expired(now)):
                pending = True
        if not pending or now >= deadline:
            break
        time.sleep(0.005)
    for w in workers:
        w.threads = w.stack.read() if w.stack is not None else []


def _tasks_answer(w: WorkerDump) -> dict[str, Any] | None:
    """The loop's first answer written since we asked (monotonic stamps: one clock)."""
    for line in stackdump.read_from(w.tasks_path, w.tasks_offset).splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("stamp", 0) >= w.asked_at:
            return doc
    return None


def _thread_name(w: WorkerDump, t: stackdump.ThreadStack) -> str:
    names = (w.tasks or {}).get("threads") or {}
    name = names.get(t.ident)
    if t.current:
        return "main thread, the event loop"
    return str(name) if name else ""


def render(master: int, runtime: str, workers: Sequence[WorkerDump]) -> str:
    lines = [f"master pid {master} ({runtime})"]
    for w in workers:
        lines.append(f"worker {w.slot + 1} pid {w.pid}")
        if not w.threads:
            lines.append(f"  stacks: no answer within {STACK_WAIT:g}s")
        for t in w.threads:
            name = _thread_name(w, t)
            lines.append(f"  thread {t.ident}" + (f" ({name})" if name else "")
                         + ", innermost call last:")
            lines.extend(f"    {f}" for f in t.frames)
        if w.tasks is None:
            lines.append(f"  asyncio tasks: unavailable: the event loop is blocked (it did "
                         f"not answer within {TASKS_WAIT:g}s); its stack is above")
            continue
        tasks = w.tasks.get("tasks") or []
        lines.append(f"  asyncio tasks ({len(tasks)} pending, outermost await first):")
        for task in tasks:
            lines.append(f"    {task.get('name')} {task.get('coroutine')}:")
            lines.extend(f'      File "{f["file"]}", line {f["line"]}, in {f["function"]}'
                         for f in task.get("frames") or [])
    return "\n".join(lines) + "\n"


def as_json(master: int, runtime: str, workers: Sequence[WorkerDump]) -> dict[str, Any]:
    out = []
    for w in workers:
        threads = stackdump.to_json(w.threads)
        for t, doc in zip(w.threads, threads, strict=True):
            doc["name"] = _thread_name(w, t)
        out.append({"slot": w.slot + 1, "pid": w.pid, "threads": threads,
                    "tasks": None if w.tasks is None else w.tasks.get("tasks", []),
                    "tasks_unavailable": None if w.tasks is not None else
                    "the event loop is blocked"})
    return {"master": {"pid": master, "stacks_dir": runtime}, "workers": out}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"hello-cluster dump: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hello-cluster dump",
                description="Print every live worker's Python stacks (all threads) and its "
                            "event loop's pending asyncio tasks, without stopping it.",
                epilog="Exit status: 0 dumped, 1 no live worker in --slot, 3 the master "
                       "cannot be reached. Run it as root or as the workers' user.")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="the server's --runtime-dir (default: HELLO_CLUSTER_RUNTIME_DIR, "
                        "RUNTIME_DIRECTORY, else your hello-cluster-* temp dirs)")
    p.add_argument("--slot", type=int, metavar="N", help="only the worker in slot N (1..)")
    p.add_argument("--json", action="store_true", help="one JSON document per master")
    return p


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(argv))
    if args.slot is not None and args.slot < 1:
        print("hello-cluster dump: error: --slot counts from 1", file=sys.stderr)
        return EXIT_USAGE
    slot = None if args.slot is None else args.slot - 1
    try:
        masters = find_masters(runtime_dirs(args.runtime_dir, env))
        code = EXIT_OK
        for pid, directory in masters:
            workers = workers_of(directory, slot)
            if not workers and slot is not None:
                print(f"hello-cluster dump: master pid {pid} has no live worker in slot "
                      f"{args.slot}", file=sys.stderr)
                code = EXIT_NO_SLOT
                continue
            ask(workers)
            if args.json:
                print(json.dumps(as_json(pid, directory, workers), indent=2))
            else:
                sys.stdout.write(render(pid, directory, workers))
        return code
    except Unreachable as err:
        print(f"hello-cluster dump: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
