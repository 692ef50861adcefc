"""Listening sockets: taken over from systemd socket activation, or bound by us.

The master owns the listeners and the workers inherit them across fork(). A socket systemd
passed (or a unix socket) is one socket every worker serves. A TCP address we bind
ourselves is, by default, a SO_REUSEPORT group with one socket per worker slot, steered by
`balance` so that new connections spread evenly over the ready workers.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from hello_cluster.config import BindAddress, is_decimal
from hello_cluster.errors import ListenerError
from hello_cluster.system import balance

log = logging.getLogger("hello_cluster.sockets")

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


DEFER_ACCEPT_S = 1  # --defer-accept: how long the kernel holds a connection that sends nothing


def bind(address: BindAddress, what: str = "--bind", reuse_port: bool = False,
         defer_accept: bool = False) -> socket.socket:
    """Bind and listen, turning the kernel's refusals into messages an operator can act on.

    `defer_accept` (`--defer-accept`, TCP only): TCP_DEFER_ACCEPT, nginx's `deferred` and
    systemd's `DeferAcceptSec=`. The kernel completes the handshake for the client but
    hands the connection to accept() only with its first bytes (or after DEFER_ACCEPT_S of
    silence), so a worker wakes once for the connection and its request instead of twice,
    about 8 us of CPU less per connection here (docs/benchmarks.md), and a connection that
    says nothing waits in the kernel instead of in a worker's place."""
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
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if defer_accept:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
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
class PortGroup:
    """One TCP address as a SO_REUSEPORT group: socket i belongs to worker slot i.

    The kernel numbers a group's sockets in the order they started listening and renumbers
    only when one closes; the master keeps all of them open until it stops, so position i
    in `socks` is index i for the steering program.
    """

    address: BindAddress
    socks: list[socket.socket]
    defer_accept: bool = False

    @classmethod
    def bind(cls, address: BindAddress, slots: int, defer_accept: bool = False) -> PortGroup:
        # A plain bind first: SO_REUSEPORT would silently share a port another process of
        # this user already listens on with it, and split the traffic with a stranger.
        bind(address).close()
        first = bind(address, reuse_port=True, defer_accept=defer_accept)
        group = cls(BindAddress(address.host, first.getsockname()[1]), [first], defer_accept)
        try:
            group.grow(slots)
            group.steer(list(range(slots)))
        except (ListenerError, OSError):
            group.close()
            raise
        return group

    def grow(self, slots: int) -> None:
        while len(self.socks) < slots:
            self.socks.append(bind(self.address, reuse_port=True,
                                   defer_accept=self.defer_accept))

    def steer(self, slots: Sequence[int]) -> None:
        """`slots` sorted: the program's shape then depends on the set alone."""
        balance.attach(self.socks[0], balance.program(slots))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []


@dataclass
class Listeners:
    app: list[socket.socket] = field(default_factory=list)  # served by every worker
    groups: list[PortGroup] = field(default_factory=list)  # one socket per worker slot
    metrics: socket.socket | None = None
    activated: bool = False

    def for_slot(self, slot: int) -> list[socket.socket]:
        """What a worker in `slot` serves: the shared sockets and its own in each group."""
        return [*self.app, *(g.socks[slot] for g in self.groups)]

    def neighbours(self, slot: int) -> list[socket.socket]:
        """The next slot's socket in each group, which a worker in `slot` helps (steal.py)."""
        return [g.socks[(slot + 1) % len(g.socks)] for g in self.groups
                if slot >= 0 and len(g.socks) > 1]

    def not_for_slot(self, slot: int) -> list[int]:
        """Other slots' sockets, which a worker closes so it never holds them open."""
        keep = {s.fileno() for s in self.neighbours(slot)}
        return [s.fileno() for g in self.groups for i, s in enumerate(g.socks)
                if i != slot and s.fileno() not in keep]

    def grow(self, slots: int) -> None:
        for group in self.groups:
            group.grow(slots)

    def steer(self, slots: Iterable[int]) -> None:
        """Send new connections only to these slots (the ones with a ready worker)."""
        chosen = sorted(slots)
        for group in self.groups:
            group.steer(chosen)

    def close_app(self) -> None:
        for sock in self.app:
            sock.close()
        self.app = []
        for group in self.groups:
            group.close()
        self.groups = []

    def describe(self) -> str:
        return ", ".join([*(_describe(s) for s in self.app),
                          *(f"{_describe(g.socks[0])} (SO_REUSEPORT, {len(g.socks)} sockets)"
                            for g in self.groups)])


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = name[0]
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return f"unix:{name}"


def open_listeners(binds: tuple[BindAddress, ...], metrics_bind: BindAddress | None,
                   env: MutableMapping[str, str], pid: int, slots: int = 1,
                   reuse_port: str = "off", defer_accept: bool = False) -> Listeners:
    """Socket activation when systemd passed fds to this pid, else bind --bind ourselves.

    `defer_accept` applies to the TCP addresses we bind (see `bind`); systemd's sockets
    keep what their unit says (the shipped one: `DeferAcceptSec=1s`).

    `reuse_port` (`--reuse-port`): "auto" makes each TCP address we bind a steered
    SO_REUSEPORT group (one socket per worker slot; SIGTTIN adds more), and falls back to
    one shared socket (with a warning) where the kernel refuses the steering program; "on"
    insists; "off" always shares one socket. Unix sockets and systemd's sockets are always shared.
    """
    activation = parse_listen_env(env, pid)
    clear_listen_env(env)
    listeners = Listeners()
    try:
        if activation is not None:
            listeners.activated = True
            if reuse_port == "on":
                log.warning("--reuse-port on: systemd passed the listening sockets, so all "
                            "workers share them; bind them ourselves (no .socket unit) to "
                            "get one socket per worker")
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
            for address in binds:
                group = None
                if address.path is None and reuse_port != "off":
                    group = _steered_group(address, slots, reuse_port == "on", defer_accept)
                if group is not None:
                    listeners.groups.append(group)
                else:
                    listeners.app.append(bind(address, defer_accept=defer_accept))
        if listeners.metrics is None and metrics_bind is not None:
            listeners.metrics = bind(metrics_bind, "--metrics-bind")
    except ListenerError:
        listeners.close_app()
        if listeners.metrics is not None:
            listeners.metrics.close()
        raise
    return listeners


def _steered_group(address: BindAddress, slots: int, insist: bool,
                   defer_accept: bool = False) -> PortGroup | None:
    """The group, or None (shared socket) where the kernel refuses steering and we may."""
    try:
        return PortGroup.bind(address, slots, defer_accept)
    except OSError as err:  # the steering program was refused (ListenerError passes by)
        if insist:
            raise ListenerError(f"--bind {address}: --reuse-port on, but the kernel refused "
                                f"the steering program ({err.strerror or err}); use "
                                "--reuse-port off") from None
        log.warning("--bind %s: the kernel refused SO_REUSEPORT steering (%s); all workers "
                    "share one socket", address, err.strerror or err)
        return None
