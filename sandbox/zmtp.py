"""The runtime's end of a kernel's channels: ZMTP 3.0 over unix sockets, every byte accounted for.

libzmq is not used on this side. Whatever RCVHWM and MAXMSGSIZE say, it
assembles a whole multipart message before the reader sees any of it (600
frames of 1 MB, sent as one message, cost the receiver 600 MB with RCVHWM=1),
and the other end of each socket belongs to the cell: it can write any bytes
to it. Here a frame or message over its limit is a protocol error the moment
its header says so (a frame declaring 2**63 bytes is never waited for): the
connection ends for good and the owner is told why (the kernel, whose own
messages are capped well below the limits, is replaced). A connection hands
control back to the event loop once it has used its slice of time (other
kernels' cells and every deadline run in between). Memory per connection:
one partial message (at most ``max_message_bytes``) plus one read (256 KB).

Only what the runtime needs: the NULL mechanism, DEALER and SUB, connecting
to a socket the kernel binds (ipykernel's ``ipc`` transport). The socket is
dialled without following a symbolic link (``dial``): its directory is the
runtime's, but the kernel made the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import resource
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

# signature, version 3.0, mechanism NULL, as-server 0, filler.
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
MORE, LONG, COMMAND = 1, 2, 4
MAX_RECONNECT_DELAY = 0.5


@dataclass(frozen=True)
class WireLimits:
    """What one kernel may make the runtime hold or spend."""

    # One message, all frames together (a Jupyter message is 6-7 frames).
    max_message_bytes: int = 2 * 1024 * 1024
    max_frames: int = 16
    # READY and other commands are a few dozen bytes.
    max_command_bytes: int = 4096
    # CPU time one connection may take before the event loop serves others.
    slice_s: float = 0.002


Frames = list[bytes]


@functools.cache
def raise_fd_limit() -> int:
    """Lift this process's open-file limit to its hard limit (each kernel costs four fds here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


class ProtocolError(Exception):
    """The peer broke ZMTP or a limit; the connection is dropped for good."""


def dial(path: str) -> socket.socket:
    """A non-blocking unix socket connected to ``path``, whose last component must be a socket, not a link.

    The directory part is the runtime's own (nothing in it is the kernel's);
    the last component was made by the kernel, which could have put a
    symbolic link there to a socket of the host. It is opened with
    O_PATH|O_NOFOLLOW in the directory, checked to be a socket, and
    connected to through its descriptor, so no link is ever followed.
    """
    parent, name = os.path.split(path)
    dfd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, f"{path} is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(f"/proc/self/fd/{fd}")
        except OSError:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


def encode(frames: Frames) -> bytes:
    out = bytearray()
    last = len(frames) - 1
    for i, body in enumerate(frames):
        more = MORE if i < last else 0
        if len(body) > 255:
            out.append(more | LONG)
            out += len(body).to_bytes(8, "big")
        else:
            out.append(more)
            out.append(len(body))
        out += body
    return bytes(out)


def _command(name: bytes, body: bytes = b"") -> bytes:
    payload = bytes([len(name)]) + name + body
    if len(payload) > 255:
        return bytes([COMMAND | LONG]) + len(payload).to_bytes(8, "big") + payload
    return bytes([COMMAND, len(payload)]) + payload


def _ready(socket_type: bytes) -> bytes:
    name = b"Socket-Type"
    return _command(b"READY", bytes([len(name)]) + name + len(socket_type).to_bytes(4, "big") + socket_type)


class Channel(asyncio.Protocol):
    """One ZMTP connection to ``path``, redialled when the peer closes it.

    ``on_message`` gets each complete message within the limits;
    ``on_broken`` is told (once) why the peer broke the protocol or a limit,
    after which the connection stays closed. Both run inside the event
    loop's read callback and must not raise.
    """

    def __init__(
        self,
        path: str,
        socket_type: bytes,
        on_message: Callable[[Frames], None],
        on_broken: Callable[[str], None],
        counts: Counter[str],
        limits: WireLimits,
        subscribe: bool = False,
    ) -> None:
        self.path = path
        self._type = socket_type
        self._on_message = on_message
        self._on_broken = on_broken
        self.broken: str | None = None
        self.counts = counts
        self.limits = limits
        self._subscribe = subscribe
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._ready = False
        self._pending: list[bytes] = []
        self._closed = False
        self._dialer: asyncio.Task[None] | None = None
        self._failures = 0
        # Reading is wanted by the owner (a request is in flight) and not
        # held back for fairness (this connection used up its slice).
        self._wanted = True
        self._throttled = False
        self._resume: asyncio.Handle | None = None
        # Loop time of the last bytes read: traffic, useful or not.
        self.last_activity = 0.0
        self._reset_parser()
        self._dial()

    # --- connection ---------------------------------------------------------

    def _dial(self, delay: float = 0.0) -> None:
        if not self._closed:
            self._dialer = self._loop.create_task(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        while not self._closed:
            try:
                await self._loop.create_unix_connection(lambda: self, sock=dial(self.path))
                return
            except OSError:
                # Not bound yet (the kernel is starting), or gone: retry soon,
                # as zmq's reconnect would.
                await asyncio.sleep(0.005)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._closed:
            transport.close()
            return
        self._transport = transport
        self._reset_parser()
        transport.write(GREETING + _ready(self._type))
        self._apply_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._ready = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._throttled = False
        if self._closed:
            return
        self.counts["reconnects"] += 1
        self._failures += 1
        self._dial(min(0.005 * 2**self._failures, MAX_RECONNECT_DELAY))

    def _break(self, why: str) -> None:
        """The peer broke the protocol or a limit: close for good and tell the owner."""
        self.counts["protocol_errors"] += 1
        self.broken = why
        self.close()
        self._on_broken(why)

    def close(self) -> None:
        self._closed = True
        if self._dialer is not None:
            self._dialer.cancel()
        if self._resume is not None:
            self._resume.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._pending.clear()

    # --- sending ------------------------------------------------------------

    def send(self, frames: Frames) -> None:
        """Queued until the peer's READY, as a zmq socket queues before it connects."""
        data = encode(frames)
        if self._ready and self._transport is not None:
            self._transport.write(data)
        else:
            self._pending.append(data)

    # --- reading ------------------------------------------------------------

    def want_reading(self, wanted: bool) -> None:
        """Between requests nothing is read: what a kernel sends then waits in its own buffers."""
        self._wanted = wanted
        self._apply_reading()

    def _apply_reading(self) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        # The handshake is always read; after it, only while wanted.
        if (self._wanted or not self._ready) and not self._throttled:
            if not t.is_reading():
                t.resume_reading()
        elif t.is_reading():
            t.pause_reading()

    def _reset_parser(self) -> None:
        self._buf = bytearray()
        self._greeted = False
        self._frames: Frames = []
        self._msg_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.last_activity = self._loop.time()
        self._buf += data
        self._parse()

    def _parse(self) -> None:
        self._resume = None
        try:
            with memoryview(self._buf) as view:
                used, out_of_time = self._consume(view, time.perf_counter())
        except ProtocolError as exc:
            self._buf.clear()
            self._break(str(exc))
            return
        del self._buf[:used]
        if out_of_time and self._buf:
            # Complete frames are still buffered but this connection's slice is
            # used up: let the loop serve the others (timers included), then
            # carry on. Nothing more is read from the socket meanwhile.
            self._throttled = True
            self._apply_reading()
            self._resume = self._loop.call_soon(self._carry_on)
        elif self._throttled:
            self._throttled = False
            self._apply_reading()

    def _carry_on(self) -> None:
        if self._transport is not None:
            self._parse()

    def _consume(self, buf: memoryview, started: float) -> tuple[int, bool]:
        """Parse what is buffered: (bytes used, stopped because the slice ran out)."""
        end = len(buf)
        i = 0
        limits = self.limits
        if not self._greeted:
            if end < 10:
                return 0, False
            if buf[0] != 0xFF or buf[9] != 0x7F:
                raise ProtocolError("not ZMTP")
            if end < 64:
                return 0, False
            if buf[10] < 3 or bytes(buf[12:16]) != b"NULL":
                raise ProtocolError("not ZMTP 3 with the NULL mechanism")
            self._greeted = True
            i = 64
        while i < end:
            flags = buf[i]
            if flags & ~(MORE | LONG | COMMAND):
                raise ProtocolError("reserved frame flags")
            head = 9 if flags & LONG else 2
            if end - i < head:
                break
            size = int.from_bytes(buf[i + 1 : i + 9], "big") if flags & LONG else buf[i + 1]
            if flags & COMMAND:
                if size > limits.max_command_bytes or self._frames:
                    raise ProtocolError("command too large, or inside a message")
                if end - i < head + size:
                    break
                self._command(bytes(buf[i + head : i + head + size]))
                i += head + size
                continue
            if not self._ready:
                raise ProtocolError("message before READY")
            more = bool(flags & MORE)
            if len(self._frames) >= limits.max_frames:
                raise ProtocolError(f"a message of more than {limits.max_frames} frames")
            if self._msg_bytes + size > limits.max_message_bytes:
                # Decided from the frame's header: its body is never waited for.
                raise ProtocolError(
                    f"a message of at least {self._msg_bytes + size} bytes, over the limit of "
                    f"{limits.max_message_bytes}"
                )
            i += head
            if end - i < size:
                i -= head
                break
            self._frames.append(bytes(buf[i : i + size]))
            self._msg_bytes += size
            i += size
            if not more:
                frames = self._frames
                self._frames = []
                self._msg_bytes = 0
                self._failures = 0
                self._on_message(frames)
                if time.perf_counter() - started > limits.slice_s:
                    return i, True
        return i, False

    def _command(self, body: bytes) -> None:
        name_len = body[0] if body else 0
        name = body[1 : 1 + name_len]
        if name == b"READY" and not self._ready:
            self._ready = True
            assert self._transport is not None
            if self._subscribe:
                # ZMTP 3.0 subscription: a message of \x01 + topic (all topics).
                self._transport.write(encode([b"\x01"]))
            for data in self._pending:
                self._transport.write(data)
            self._pending.clear()
            self._apply_reading()
        elif name == b"ERROR":
            raise ProtocolError("the peer sent ERROR")
        # PING needs ZMTP 3.1 heartbeats, never asked for; anything else is ignored.
