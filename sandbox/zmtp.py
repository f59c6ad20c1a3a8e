"""The runtime's end of a kernel's channels: ZMTP 3.0 over unix sockets, every byte accounted for.

libzmq is not used on this side. Whatever RCVHWM and MAXMSGSIZE say, it
assembles a whole multipart message before the reader sees any of it (600
frames of 1 MB, sent as one message, cost the receiver 600 MB with RCVHWM=1),
and the other end of each socket belongs to the cell: it can write any bytes
to it. Here a frame or message over its limit is skipped as it streams past,
never held; a connection that breaks the protocol is dropped and redialled
with back-off; and a connection hands control back to the event loop once it
has used its slice of time (other kernels' cells and every deadline run in
between). Memory per connection: one partial message (at most
``max_message_bytes``) plus one read (256 KB).

Only what the runtime needs: the NULL mechanism, DEALER and SUB, connecting
to a path the kernel binds (ipykernel's ``ipc`` transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
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
    """The peer broke ZMTP; the connection is dropped."""


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
    """One ZMTP connection to ``path``, redialled when it breaks.

    ``on_message`` gets each complete message within the limits;
    ``on_oversized`` gets the frames kept of one that was not (those before
    the frame that broke a limit) and its size. Both run inside the event
    loop's read callback and must not raise.
    """

    def __init__(
        self,
        path: str,
        socket_type: bytes,
        on_message: Callable[[Frames], None],
        on_oversized: Callable[[Frames, int], None],
        counts: Counter[str],
        limits: WireLimits,
        subscribe: bool = False,
    ) -> None:
        self.path = path
        self._type = socket_type
        self._on_message = on_message
        self._on_oversized = on_oversized
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
                await self._loop.create_unix_connection(lambda: self, self.path)
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

    def _drop(self, why: str) -> None:
        self.counts[why] += 1
        if self._transport is not None:
            self._transport.abort()

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
        self._skip = 0  # bytes of an oversized frame still to pass over
        self._dropping = False  # the current message broke a limit
        self._skipped_more = False

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        if self._skip and not self._buf:
            # The common case of an oversized frame: pass over it without copying.
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if self._skip == 0 and not self._skipped_more:
                self._end_dropped()
            if not data:
                return
        self._buf += data
        self._parse()

    def _parse(self) -> None:
        self._resume = None
        try:
            with memoryview(self._buf) as view:
                used, out_of_time = self._consume(view, time.perf_counter())
        except ProtocolError:
            self._buf.clear()
            self._drop("protocol_errors")
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
            if self._skip:
                n = min(self._skip, end - i)
                self._skip -= n
                i += n
                if self._skip:
                    break
                if not self._skipped_more:
                    self._end_dropped()
                continue
            flags = buf[i]
            if flags & ~(MORE | LONG | COMMAND):
                raise ProtocolError("reserved frame flags")
            head = 9 if flags & LONG else 2
            if end - i < head:
                break
            size = int.from_bytes(buf[i + 1 : i + 9], "big") if flags & LONG else buf[i + 1]
            if flags & COMMAND:
                if size > limits.max_command_bytes or self._frames or self._dropping:
                    raise ProtocolError("command too large, or inside a message")
                if end - i < head + size:
                    break
                self._command(bytes(buf[i + head : i + head + size]))
                i += head + size
                continue
            if not self._ready:
                raise ProtocolError("message before READY")
            more = bool(flags & MORE)
            i += head
            if (
                self._dropping
                or len(self._frames) >= limits.max_frames
                or self._msg_bytes + size > limits.max_message_bytes
            ):
                # Over a limit: pass over the rest of this message as it arrives.
                if not self._dropping:
                    self._dropping = True
                    self.counts["oversized"] += 1
                self._msg_bytes += size
                self._skip = size
                self._skipped_more = more
                if size == 0 and not more:
                    self._end_dropped()
                continue
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

    def _end_dropped(self) -> None:
        kept, size = self._frames, self._msg_bytes
        self._frames = []
        self._msg_bytes = 0
        self._dropping = False
        self._on_oversized(kept, size)

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
