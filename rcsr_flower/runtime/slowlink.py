"""A slow link in user space: a TCP proxy that delays and throttles what passes through.

A kernel without the ``netem`` queueing discipline cannot delay or throttle packets, so
this proxy does it for one server: it listens on the server host's own address and
forwards to the server listening on that host's loopback. Clients connect to the
address the server's certificate names, TLS passes through end to end (the proxy sees
only ciphertext), and every chunk each way

- waits its turn on the peer's link in that direction: ``rate`` bytes per second shared
  by all of that peer's connections (a node's uplink, not one socket's);
- then travels ``delay`` seconds, in order.

A reader of a direction stops reading while 64 chunks wait to be sent, so TCP's own flow
control pushes back on a sender faster than the link, as on a real one.

::

    python -m rcsr_flower.runtime.slowlink --listen 198.18.0.1:9092 \\
        --upstream 127.0.0.1:9092 --delay-ms 100 --rate-mbit 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 64 * 1024
QUEUED = 64  # chunks a direction holds before its reader waits


@dataclass(frozen=True)
class Link:
    delay: float = 0.0  # seconds, each way
    rate: float | None = None  # bytes per second, each way, per peer; None: unlimited

    def __str__(self) -> str:
        rate = "unlimited" if self.rate is None else f"{self.rate * 8 / 1e6:g} Mbit/s"
        return f"{self.delay * 1000:g} ms each way, {rate}"


class Pacer:
    """One direction of one peer's link: when each chunk has finished leaving it."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.free_at = 0.0

    def sent(self, size: int, now: float) -> float:
        if self.rate is None:
            return now
        self.free_at = max(now, self.free_at) + size / self.rate
        return self.free_at


class SlowLink:
    """The proxy: ``await serve()`` (or :meth:`start` on a thread of its own)."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], link: Link) -> None:
        self.listen, self.upstream, self.link = listen, upstream, link
        self._pacers: dict[tuple[str, str], Pacer] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections = 0

    def _pacer(self, peer: str, direction: str) -> Pacer:
        return self._pacers.setdefault((peer, direction), Pacer(self.link.rate))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pacer: Pacer
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED)

        async def receive() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except ConnectionError:
                    data = b""
                now = loop.time()
                due = (pacer.sent(len(data), now) if data else now) + self.link.delay
                await queue.put((due, data))
                if not data:
                    return

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:  # the other side closed its half: close ours, in order
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        receiving = asyncio.ensure_future(receive())
        try:
            await send()
        except ConnectionError:
            pass
        finally:
            receiving.cancel()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        peer = str(client_w.get_extra_info("peername")[0])
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:  # the server is down: reset, as a host with nothing listening does
            sock = client_w.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client_w.close()
            return
        self.connections += 1
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, self._pacer(peer, "up")),
                self._pump(server_r, client_w, self._pacer(peer, "down")),
            )
        finally:
            for w in (client_w, server_w):
                w.close()

    async def serve(self, on_ready: Callable[[], object] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, *self.listen, reuse_address=True)
        self.listen = self._server.sockets[0].getsockname()[:2]  # port 0: the one it got
        if on_ready is not None:
            on_ready()
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> threading.Thread:
        """Serve on a daemon thread of its own; returns once it listens."""
        ready = threading.Event()
        thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_quietly(ready)), daemon=True
        )
        thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"slow link did not listen on {self.listen} in 10 s")
        return thread

    async def _serve_quietly(self, ready: threading.Event) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.serve(ready.set)

    def close(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.runtime.slowlink",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT of the server")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--rate-mbit", type=float, default=None, help="per peer, each way")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or (args.rate_mbit is not None and args.rate_mbit <= 0):
        parser.error("--delay-ms must be >= 0 and --rate-mbit > 0")
    link = Link(args.delay_ms / 1000, None if args.rate_mbit is None else args.rate_mbit * 1e6 / 8)
    proxy = SlowLink(args.listen, args.upstream, link)
    (host, port), (up_host, up_port) = args.listen, args.upstream
    message = f"slow link listening on {host}:{port} -> {up_host}:{up_port}, {link}"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(proxy.serve(lambda: print(message, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
