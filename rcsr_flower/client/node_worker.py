"""A node's warm worker: the ClientApp's work in one long-lived process per SuperNode.

In a deployment Flower starts a fresh ClientApp process for every message (FLOWER.md),
and each would import torch and transformers and load the backbone again: about 4.5 s
on this project's 2-core machine before it does any work, most of it importing
transformers' CLIP model code, which cannot be trimmed from outside transformers. So a
SuperNode started with ``worker-idle-s=<seconds>`` in its ``--node-config`` hands the
work to a worker process that keeps torch, the backbone and the node's data loaded:

- the first message a ClientApp sees starts the worker (``python -m
  rcsr_flower.client.node_worker``, from the same app directory and interpreter) and waits until
  it listens; later messages connect to it, wait for its greeting (it has accepted the
  connection: a dead worker's socket may take one and reset it), send ``(kind, content,
  context)`` (Flower's protobuf encoding, nothing pickled) and get the reply's content,
  the updated ``context.state`` and the log lines the work wrote, which the ClientApp
  writes to its own log. The work is the same functions
  (``rcsr_flower.client.handlers.REPLIES``) the ClientApp runs itself without a worker.
- one worker per SuperNode and app version: it is keyed by the app directory, the
  interpreter, the node config and the ClientApp's parent (the SuperNode's SuperExec), so
  a new FAB or a restarted SuperNode gets a new worker. A run config is sent with every
  message, so consecutive runs share a worker (and its backbone).
- a worker ends when its SuperNode's SuperExec is gone, or after ``worker-idle-s`` seconds
  without a message; a worker that crashes (or is killed) fails the message it was
  working on, as a crashed ClientApp would, and the next message starts a new one.
- messages are worked on one at a time, as a Ray actor does in simulation.
- it listens on a Unix socket in a directory only this user can open
  (``$XDG_RUNTIME_DIR`` or the temporary directory, ``rcsr-flower-<uid>/``); its log is
  next to the socket.

Without ``worker-idle-s`` (and always in simulation, where Ray's actors already live
across messages) the ClientApp does the work itself.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from rcsr_flower.config import NodeConfig
from rcsr_flower.runtime.processes import process_start

log = logging.getLogger("flwr").getChild(__name__)  # a ClientApp's INFO reaches its node's log

START_TIMEOUT_S = 300.0  # importing torch + transformers on a loaded machine, with margin
GREETING = b"rcsr-flower-worker\n"  # sent on accept: the ClientApp knows it was taken in
_HEADER = struct.Struct("!Q")
_COUNT = struct.Struct("!I")


class NodeWorkerError(RuntimeError):
    """The node's worker could not be started, or ended while working on a message."""


class WorkerRaised(RuntimeError):
    """The work raised in the worker: ``"<ExceptionType>: <message>"``; its cause, a
    :class:`WorkerTraceback`, is where."""


class WorkerTraceback(Exception):
    """Where, in the worker, the exception a handler re-raises came from."""


def reply(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply's content for a ``kind`` message, from the node's worker when it has one.

    The node config is validated here, in the ClientApp, so that a bad one fails the
    message before a worker is started for it."""
    idle = NodeConfig.from_flower(context.node_config).worker_idle_s
    if idle == 0:
        from rcsr_flower.client.handlers import REPLIES

        return REPLIES[kind](content, context)
    return Worker.for_node(context.node_config, idle).call(kind, content, context)


# ------------------------------------------------------------------ wire format
# A message is a JSON header and byte frames: Flower's own protobuf encoding of the records
# and the Context (what flwr-clientapp and the SuperNode exchange), so nothing is unpickled
# (tests/test_security.py).
def send(sock: socket.socket, header: dict, frames: Sequence[bytes] = ()) -> None:
    parts = [json.dumps(header).encode(), *frames]
    sock.sendall(_COUNT.pack(len(parts)) + b"".join(_HEADER.pack(len(x)) for x in parts))
    for part in parts:
        sock.sendall(part)


def recv(sock: socket.socket) -> tuple[dict, list[bytes]]:
    (count,) = _COUNT.unpack(_exactly(sock, _COUNT.size))
    sizes = [_HEADER.unpack_from(_exactly(sock, _HEADER.size))[0] for _ in range(count)]
    parts = [bytes(_exactly(sock, size)) for size in sizes]
    return json.loads(parts[0]), parts[1:]


def _records(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _context(data: bytes) -> Context:
    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = sock.recv_into(view[done:])
        if n == 0:
            raise EOFError(f"connection closed after {done} of {size} bytes")
        done += n
    return buf


# ------------------------------------------------------------------ where workers live
def worker_home() -> Path:
    """A directory only this user can open: its sockets need no other authentication."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    home = Path(base) / f"rcsr-flower-{os.getuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    info = home.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not home.is_dir():
        raise NodeWorkerError(
            f"{home} must be a directory owned by this user and closed to others (mode 700); "
            "remove it, or point XDG_RUNTIME_DIR at a private directory"
        )
    return home


@contextlib.contextmanager
def _start_lock(socket_path: Path) -> Iterator[None]:
    """The start lock of the worker listening on ``socket_path`` (one file beside it): held
    by a ClientApp while it starts the worker, and by the worker while it stops listening."""
    with open(socket_path.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Worker:
    """One node's worker, as a ClientApp sees it: where it listens, how to start it."""

    key: str
    home: Path
    app_dir: Path
    parent: int
    parent_start: str
    idle_s: float

    @classmethod
    def for_node(cls, node_config, idle_s: float) -> Worker:
        app_dir = Path(__file__).resolve().parents[1]  # where this ClientApp's code came from
        parent = os.getppid()
        parent_start = process_start(parent) or ""
        ident = {
            "app": str(app_dir),
            "python": sys.executable,
            "parent": [parent, parent_start],
            "node": sorted((str(k), str(v)) for k, v in node_config.items()),
        }
        key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
        return cls(key, worker_home(), app_dir, parent, parent_start, idle_s)

    @property
    def socket_path(self) -> Path:
        return self.home / f"{self.key}.sock"

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.key}.log"

    # ------------------------------------------------------------ the ClientApp side
    def call(self, kind: str, content: RecordDict, context: Context) -> RecordDict:
        """Have the worker work on the message; ``context.state`` becomes its result."""
        frames = [
            recorddict_to_proto(content).SerializeToString(),
            context_to_proto(context).SerializeToString(),
        ]
        with self.connect() as sock:
            send(sock, {"kind": kind}, frames)
            try:
                header, frames = recv(sock)
            except (EOFError, ConnectionError) as exc:
                raise NodeWorkerError(
                    f"the node worker ended while working on a {kind} message ({exc}); "
                    f"its log: {self.log_path}"
                ) from None
        for name, level, text in header["logs"]:
            logging.getLogger(name).log(level, "%s", text)
        if not header["ok"]:
            raise WorkerRaised(header["error"]) from WorkerTraceback(header["traceback"])
        context.state = _records(frames[1])
        return _records(frames[0])

    @contextlib.contextmanager
    def connect(self) -> Iterator[socket.socket]:
        sock = self._try_connect()
        if sock is None:
            with _start_lock(self.socket_path):  # one ClientApp starts it; the others wait
                sock = self._try_connect() or self._start()
        with sock:
            yield sock

    def _try_connect(self) -> socket.socket | None:
        """A connection the worker has accepted (its greeting came; it may first finish
        another ClientApp's message), or None: nobody listens there, or the listener
        ended before it accepted us. A killed worker's socket could still take a
        connection and then reset it (seen under load): that was reported as the worker
        dying while working on a message it never saw, and no new worker was started."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
            if sock.recv(len(GREETING), socket.MSG_WAITALL) == GREETING:
                return sock
        except (FileNotFoundError, ConnectionError):
            pass
        sock.close()
        return None

    def _start(self) -> socket.socket:
        """Start the worker (the lock is held) and connect once it listens."""
        self.socket_path.unlink(missing_ok=True)  # a crashed worker's: nobody listens on it
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(self.app_dir), os.environ.get("PYTHONPATH")) if p
            ),
        }
        cmd = [
            sys.executable,
            "-m",
            __name__,
            "--socket",
            str(self.socket_path),
            "--parent",
            str(self.parent),
            "--parent-start",
            self.parent_start,
            "--idle-s",
            str(self.idle_s),
            "--log",
            str(self.log_path),
        ]
        started = time.monotonic()
        with open(self.log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.app_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this ClientApp, not its signals
            )
        while True:
            sock = self._try_connect()
            if sock is not None:
                log.info(
                    "started node worker (pid %d) in %.1f s; log: %s",
                    proc.pid,
                    time.monotonic() - started,
                    self.log_path,
                )
                return sock
            code = proc.poll()
            if code is not None:
                raise NodeWorkerError(
                    f"the node worker exited ({code}) before it listened; the end of its "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() - started > START_TIMEOUT_S:
                proc.kill()
                raise NodeWorkerError(
                    f"the node worker did not listen within {START_TIMEOUT_S:.0f} s; the end "
                    f"of its log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)


def _tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return "(no log)"


# ------------------------------------------------------------------ the worker side
class _Capture(logging.Handler):
    """The log lines one message's work writes, to send back to its ClientApp."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        self.lines.append((record.name, record.levelno, text))


class _Watch:
    """What the worker's watchdog thread looks after: the SuperNode's SuperExec and the
    ClientApp whose message is being worked on. Either gone, the worker exits at once, as
    a ClientApp process does (Flower's parent monitor): work nobody will receive is not
    finished, and no node state is written after its node died."""

    def __init__(
        self, parent: int, parent_start: str, socket_path: Path, log_path: Path | None
    ) -> None:
        self.parent, self.parent_start = parent, parent_start
        self.socket_path, self.log_path = socket_path, log_path
        self.inode: int | None = None  # of the socket file, once bound
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None

    def run(self, every: float = 0.5) -> None:
        while True:
            time.sleep(every)
            if process_start(self.parent) != self.parent_start:
                self.exit(0, f"its SuperNode's process {self.parent} is gone")
            with self.lock:
                if self.conn is not None and _closed(self.conn):
                    self.exit(1, "the ClientApp it was working for is gone", keep_log=True)

    def release_socket(self) -> None:
        """Take the socket file away if it is still ours, under the start lock (a ClientApp
        starting the next worker holds it, and that worker may already listen there)."""
        with _start_lock(self.socket_path), contextlib.suppress(OSError):
            if self.inode is not None and self.socket_path.stat().st_ino == self.inode:
                self.socket_path.unlink()

    def exit(self, code: int, why: str, keep_log: bool = False) -> None:
        """Leave now, taking the socket file (if still ours) and, unless asked, the log."""
        print(f"node worker {os.getpid()} exits: {why}", flush=True)
        self.release_socket()
        if self.log_path is not None and not keep_log:
            self.log_path.unlink(missing_ok=True)
        os._exit(code)


def _closed(conn: socket.socket) -> bool:
    """The other end hung up (a ClientApp sends nothing more after its request)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _greet(conn: socket.socket) -> bool:
    """Tell the ClientApp its connection was accepted (False: it has gone meanwhile)."""
    try:
        conn.sendall(GREETING)
    except OSError:
        return False
    return True


def work_on(conn: socket.socket, replies, watch: _Watch | None = None) -> None:
    """Receive one message's ``(kind, content, context)``, work on it, send the result."""
    try:
        request, frames = recv(conn)
    except (EOFError, ConnectionError):
        return  # the ClientApp went away before it asked
    if watch is not None:
        with watch.lock:
            watch.conn = conn
    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    header: dict = {"ok": True}
    out: list[bytes] = []
    try:
        context = _context(frames[1])
        content = replies[request["kind"]](_records(frames[0]), context)
        out = [
            recorddict_to_proto(content).SerializeToString(),
            recorddict_to_proto(context.state).SerializeToString(),
        ]
    except Exception as exc:  # the ClientApp raises it
        header = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    finally:
        root.removeHandler(capture)
        if watch is not None:
            with watch.lock:
                watch.conn = None
    header["logs"] = capture.lines
    try:
        send(conn, header, out)
    except OSError as exc:  # the ClientApp was stopped meanwhile: nothing to tell it
        print(f"could not send the reply: {exc}", flush=True)


def serve(
    socket_path: Path, parent: int, parent_start: str, idle_s: float, log_path: Path | None
) -> None:
    """Work on messages until no message came for ``idle_s`` seconds (or, through the
    watchdog, the SuperNode's SuperExec ``parent`` is gone)."""
    from rcsr_flower.client.handlers import REPLIES  # torch, the project: before listening

    # The work's log lines also go to the worker's own log as they happen (Flower's own
    # handler writes its loggers' lines there already): the trail of a worker that died.
    echo = logging.StreamHandler(sys.stderr)
    echo.addFilter(lambda record: not record.name.startswith("flwr"))
    echo.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(echo)
    watch = _Watch(parent, parent_start, socket_path, log_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    watch.inode = socket_path.stat().st_ino
    signal.signal(signal.SIGTERM, lambda *_: watch.exit(0, "stopped (SIGTERM)"))
    threading.Thread(target=watch.run, daemon=True, name="watchdog").start()
    server.listen(16)
    server.settimeout(1.0)
    print(f"node worker {os.getpid()} listening on {socket_path}", flush=True)
    last = time.monotonic()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if time.monotonic() - last > idle_s:
                break
            continue
        with conn:
            conn.settimeout(None)
            if _greet(conn):
                work_on(conn, REPLIES, watch)
        last = time.monotonic()
    watch.release_socket()  # no new connections; answer whoever connected before
    server.setblocking(False)
    while True:
        try:
            conn, _ = server.accept()
        except (BlockingIOError, TimeoutError):
            break
        with conn:
            conn.setblocking(True)
            if _greet(conn):
                work_on(conn, REPLIES, watch)
    server.close()
    print(f"node worker {os.getpid()} exits: no message for {idle_s:g} s", flush=True)
    if log_path is not None:
        log_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--parent-start", default="")
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--log", type=Path, help="deleted when the worker exits cleanly")
    args = parser.parse_args(argv)
    serve(args.socket, args.parent, args.parent_start, args.idle_s, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
