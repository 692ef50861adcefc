"""The worker-to-master pipe: one byte per event, so the master reads it without blocking.

A pipe (not the filesystem, not shared memory) because the master already multiplexes fds
in its selector, EOF tells it the worker is gone, and a blocked worker loop simply stops
writing, which is exactly the signal the hang detector needs.
"""

from __future__ import annotations

import os

READY = b"R"  # the worker's listeners accept connections
BEAT = b"H"  # the worker's event loop turned
RECYCLE = b"M"  # served --max-requests: please replace me, then stop me
ERROR = b"E"  # followed by one line of text: why the worker cannot start


class WorkerChannel:
    """The worker's end; writes never block and never raise."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def send(self, message: bytes) -> None:
        try:
            os.write(self.fd, message)
        except OSError:
            pass  # a full pipe means the master is busy; a lost beat is made up next tick

    def error(self, text: str) -> None:
        line = " ".join(text.split())[:1000]
        self.send(ERROR + line.encode("utf-8", "replace") + b"\n")


def parse(buffer: bytes) -> tuple[list[bytes], list[str], bytes]:
    """Split what the master read into events, error lines, and an unfinished remainder."""
    events: list[bytes] = []
    errors: list[str] = []
    i = 0
    while i < len(buffer):
        byte = buffer[i : i + 1]
        if byte == ERROR:
            end = buffer.find(b"\n", i)
            if end < 0:
                return events, errors, buffer[i:]
            errors.append(buffer[i + 1 : end].decode("utf-8", "replace"))
            i = end + 1
            continue
        if byte in (READY, BEAT, RECYCLE):
            events.append(byte)
        i += 1
    return events, errors, b""
