"""Listening sockets: taken over from systemd socket activation, or bound by us.

The master owns the listeners and every worker inherits them across fork(), so the kernel
spreads connections over the workers and a respawned worker serves the same socket at once.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

from hello_cluster.config import BindAddress, is_decimal
from hello_cluster.errors import ListenerError

SD_LISTEN_FDS_START = 3
METRICS_NAME = "metrics"
BACKLOG = 2048


@dataclass(frozen=True)
class Activation:
    """What `LISTEN_FDS`/`LISTEN_FDNAMES` hand us: fd numbers with their names."""

    fds: tuple[tuple[int, str], ...]


def parse_listen_env(env: Mapping[str, str], pid: int) -> Activation | None:
    """Read the socket-activation contract (sd_listen_fds(3)); pure.

    None means "not for us": no LISTEN_PID, or one naming another process (we inherited the
    variables from an ancestor). A malformed contract aimed at us is an error, not a guess.
    """
    listen_pid = env.get("LISTEN_PID")
    if listen_pid is None or "LISTEN_FDS" not in env:
        return None
    if not is_decimal(listen_pid.strip()):
        raise ListenerError(f"LISTEN_PID={listen_pid!r} is not a process id; fix the unit "
                            "or unset LISTEN_PID")
    if int(listen_pid) != pid:
        return None
    raw = env["LISTEN_FDS"].strip()
    if not is_decimal(raw):
        raise ListenerError(f"LISTEN_FDS={env['LISTEN_FDS']!r} is not a count; socket "
                            "activation must pass a number of fds")
    count = int(raw)
    if count == 0:
        return None
    if count > 1024:
        raise ListenerError(f"LISTEN_FDS={count} is implausibly large; check the .socket unit")
    names_raw = env.get("LISTEN_FDNAMES")
    if names_raw is None:
        names = ["unknown"] * count
    else:
        names = names_raw.split(":")
        if len(names) != count:
            raise ListenerError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} "
                                "fds; give each socket one FileDescriptorName=")
    return Activation(tuple((SD_LISTEN_FDS_START + i, names[i]) for i in range(count)))


def clear_listen_env(env: MutableMapping[str, str]) -> None:
    """So workers and programs they start don't take the fds for theirs."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)


def adopt_fd(fd: int, name: str) -> socket.socket:
    """Wrap a passed fd after checking it is a listening stream socket."""
    where = f"socket-activated fd {fd} ({name})"
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ListenerError(f"{where} is not open; LISTEN_FDS promises more fds than were "
                            "passed") from None
    if not stat.S_ISSOCK(mode):
        raise ListenerError(f"{where} is not a socket; fix the .socket unit")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ListenerError(f"{where} is not a stream socket; use ListenStream= in the "
                            ".socket unit")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ListenerError(f"{where} is not listening; use ListenStream= and Accept=no")
    os.set_inheritable(fd, True)
    return sock


def bind(address: BindAddress, what: str = "--bind") -> socket.socket:
    """Bind and listen, turning the kernel's refusals into messages an operator can act on."""
    if address.path is not None:
        return _bind_unix(address.path, what)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ListenerError(f"{what} {address}: cannot resolve {address.host!r} "
                            f"({err.strerror})") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise ListenerError(_bind_message(what, str(address), err)) from None
    sock.set_inheritable(True)
    return sock


def _bind_unix(path: str, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            _unlink_if_stale(path)
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise ListenerError(_bind_message(what, f"unix:{path}", err)) from None
    sock.set_inheritable(True)
    return sock


def _unlink_if_stale(path: str) -> None:
    """A socket file nobody listens on is left over from a crash; one in use is not ours."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _bind_message(what: str, address: str, err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return (f"{what} {address}: address already in use; stop the other server or choose "
                "another address")
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"{what} {address}: permission denied; ports below 1024 need root or "
                "CAP_NET_BIND_SERVICE (or use systemd socket activation)")
    if err.errno == errno.EADDRNOTAVAIL:
        return f"{what} {address}: no such local address on this machine"
    return f"{what} {address}: {err.strerror or err}"


@dataclass
class Listeners:
    app: list[socket.socket] = field(default_factory=list)
    metrics: socket.socket | None = None
    activated: bool = False

    def close_app(self) -> None:
        for sock in self.app:
            sock.close()
        self.app = []

    def describe(self) -> str:
        return ", ".join(_describe(s) for s in self.app)


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = name[0]
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return f"unix:{name}"


def open_listeners(binds: tuple[BindAddress, ...], metrics_bind: BindAddress | None,
                   env: MutableMapping[str, str], pid: int) -> Listeners:
    """Socket activation when systemd passed fds to this pid, else bind --bind ourselves."""
    activation = parse_listen_env(env, pid)
    clear_listen_env(env)
    listeners = Listeners()
    try:
        if activation is not None:
            listeners.activated = True
            for fd, name in activation.fds:
                sock = adopt_fd(fd, name)
                if name == METRICS_NAME:
                    listeners.metrics = sock
                else:
                    listeners.app.append(sock)
            if not listeners.app:
                raise ListenerError("socket activation passed only a 'metrics' socket; name "
                                    "the app socket FileDescriptorName=http")
        else:
            listeners.app = [bind(address) for address in binds]
        if listeners.metrics is None and metrics_bind is not None:
            listeners.metrics = bind(metrics_bind, "--metrics-bind")
    except ListenerError:
        listeners.close_app()
        if listeners.metrics is not None:
            listeners.metrics.close()
        raise
    return listeners
