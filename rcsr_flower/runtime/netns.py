"""Separate hosts on one machine: a Linux network namespace per host, joined by a bridge.

A deployment on loopback never sees a late or lost packet, and its certificates name
``localhost``. Here every host (the SuperLink, the user who submits runs, each SuperNode)
gets a network namespace of its own with one interface, ``eth0``, and one address in
``SUBNET``; the ``eth0`` of every host is one end of a veth pair whose other end hangs on
a bridge that lives in a namespace of its own::

      [superlink] 198.18.0.1   [user] 198.18.0.2   [node-0] 198.18.0.10   [node-1] ...
            eth0                   eth0                 eth0
             |                      |                    |
      ------ h0 ------------------ h1 ------------------ h2 ------ br0  [bridge]

Nothing touches the machine's own network stack: links are created inside the
namespaces, and ``SUBNET`` is part of 198.18.0.0/15 (RFC 2544's benchmarking range), which
no real network routes. A link is cut by setting its bridge end down (the host's cable
pulled) and restored by setting it up again. Delay and bandwidth come from user space
(:mod:`rcsr_flower.runtime.slowlink`), since a kernel without ``netem`` cannot add them.

Namespaces are named ``rcsr-<pid>-<id>-<host>``, after the process that made them: a
network is removed by :meth:`Network.close` (also on SIGTERM/SIGINT and at exit, through
:func:`rcsr_flower.runtime.processes.at_stop`), and one whose maker died without
closing it (SIGKILL) is swept by the next :class:`Network` made on this machine.
Creating namespaces needs root (``CAP_SYS_ADMIN``); :func:`unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from rcsr_flower.runtime.processes import at_stop

SUBNET = ipaddress.ip_network("198.18.0.0/24")
PREFIX = "rcsr"
BRIDGE = "bridge"
NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetworkError(RuntimeError):
    """A namespace, link or address could not be made; the message names the command."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS``; a failure raises :class:`NetworkError` with the command and its error."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out


def unavailable() -> str | None:
    """Why this machine cannot make network namespaces (None: it can)."""
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN); run as root"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except NetworkError as exc:
        return f"cannot create a network namespace with a veth pair here: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    """The names of this machine's named network namespaces."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ours(name: str) -> int | None:
    """The pid of the process that made namespace ``name`` (None: not one of ours)."""
    parts = name.split("-")
    if len(parts) < 4 or parts[0] != PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace(name: str) -> None:
    """SIGKILL every process in namespace ``name``: only what its network started there."""
    for _ in range(25):
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def remove_namespace(name: str) -> None:
    """Kill what still runs in namespace ``name``, then delete it; its links go with it."""
    kill_namespace(name)
    ip("netns", "del", name, check=False)


def sweep() -> list[str]:
    """Remove the namespaces whose maker is dead (killed before it could close them)."""
    stale = [n for n in namespaces() if (pid := ours(n)) is not None and not _alive(pid)]
    for name in stale:
        remove_namespace(name)
    return stale


@contextlib.contextmanager
def _entered(namespace: str) -> Iterator[None]:
    """The calling thread in ``namespace`` (a thread's network namespace is its own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / namespace) as there:
        if libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            raise NetworkError(f"setns({namespace}): {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            libc.setns(home.fileno(), _CLONE_NEWNET)


def call_in(namespace: str, fn: Callable[[], T]) -> T:
    """``fn()`` with its sockets in ``namespace``: run on a thread of its own, which
    enters the namespace, so the calling thread's network never changes."""
    result: list = []

    def target() -> None:
        try:
            with _entered(namespace):
                result.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            result.append((False, exc))

    thread = threading.Thread(target=target, name=f"in-{namespace}", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def deployment_hosts(num_supernodes: int) -> list[str]:
    """The hosts ``LocalDeployment`` runs on: the SuperLink, the user, ``node-<i>``."""
    return ["superlink", "user", *(f"node-{i}" for i in range(num_supernodes))]


class Network:
    """Hosts with an address each, on one bridge; :meth:`close` removes everything.

    ``hosts`` get ``SUBNET``'s addresses in order from ``.1``, except that names starting
    with ``node-`` start at ``.10`` (``node-0`` is ``.10``), so the SuperLink is ``.1``
    whatever the number of nodes."""

    def __init__(self, hosts: Sequence[str], subnet: ipaddress.IPv4Network = SUBNET) -> None:
        if reason := unavailable():
            raise NetworkError(reason)
        sweep()
        self.id = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefixlen = subnet.prefixlen
        addresses = list(subnet.hosts())
        self.hosts: dict[str, str] = {}  # host -> address
        others = 0
        for host in hosts:
            if host.startswith("node-") and host[5:].isdigit():
                index = 9 + int(host[5:])
            else:
                index, others = others, others + 1
            if index >= len(addresses) or (index > 8 and not host.startswith("node-")):
                raise NetworkError(f"{subnet} has no address left for host {host!r}")
            self.hosts[host] = str(addresses[index])
        self.made: list[str] = []
        self._closed = False
        at_stop(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def namespace(self, host: str) -> str:
        return f"{self.id}-{host}"

    def address(self, host: str) -> str:
        return self.hosts[host]

    def _link(self, host: str) -> str:
        return f"h{list(self.hosts).index(host)}"  # its end on the bridge

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        bridge = self.namespace(BRIDGE)
        self._add_namespace(bridge)
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        for host, address in self.hosts.items():
            ns, link = self.namespace(host), self._link(host)
            self._add_namespace(ns)
            ip("-n", bridge, "link", "add", link, "type", "veth", "peer", "eth0", "netns", ns)
            ip("-n", bridge, "link", "set", link, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/{self.prefixlen}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    # ------------------------------------------------------------------ use
    def command(self, host: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run on ``host`` (``ip netns exec``, which execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(host), *cmd]

    def call(self, host: str, fn: Callable[[], T]) -> T:
        """``fn()`` on ``host``: its sockets open in the host's namespace."""
        return call_in(self.namespace(host), fn)

    def kill_all(self, host: str) -> None:
        """``host`` dies: SIGKILL everything running on it."""
        kill_namespace(self.namespace(host))

    def cut(self, host: str) -> None:
        """Pull ``host``'s cable: its bridge end goes down, nothing passes either way."""
        ip("-n", self.namespace(BRIDGE), "link", "set", self._link(host), "down")

    def restore(self, host: str) -> None:
        ip("-n", self.namespace(BRIDGE), "link", "set", self._link(host), "up")

    def close(self) -> None:
        """Kill what still runs on the hosts and delete every namespace (and so every
        link) this network made. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for name in reversed(self.made):
            remove_namespace(name)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
