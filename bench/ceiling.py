"""The Python ceiling: uvloop + httptools, no ASGI, no supervisor logic, N forked processes.

Not a peer. It answers the same hello page with the least Python a server can run per
request, on a socket bound once and shared across fork() like hello-cluster's. Whatever a
real server loses against it is the cost of ASGI, the framework and supervision.

    python bench/ceiling.py --host 127.0.0.1 --port 8090 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from typing import Any

import httptools
import uvloop

BODY = b"<h1>Hello Python!</h1><p>Hello Cluster!</p>"


def _response(keep_alive: bool) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
            b"content-length: " + str(len(BODY)).encode() + b"\r\n"
            b"x-worker-pid: " + str(os.getpid()).encode() + b"\r\n")
    if not keep_alive:
        head += b"connection: close\r\n"
    return head + b"\r\n" + BODY


class Hello(asyncio.Protocol):
    """One connection: parse with httptools, answer each complete request at once."""

    keep: bytes = b""
    close: bytes = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.parser.should_keep_alive():
            self.transport.write(Hello.keep)
        else:
            self.transport.write(Hello.close)
            self.transport.close()


def serve(sock: socket.socket) -> None:
    Hello.keep, Hello.close = _response(True), _response(False)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(Hello, sock=sock, backlog=2048))
    loop.run_until_complete(server.serve_forever())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    sock.setblocking(False)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve(sock)
            finally:
                os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(p, signal.SIGTERM) for p in children])
    for _ in children:
        try:
            os.wait()
        except ChildProcessError:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
