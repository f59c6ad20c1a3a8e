"""An asyncio Jupyter client for one kernel: output is routed to the request that caused it.

jupyter_client's KernelManager is not used: it launches with TCP ports (racy
under concurrency, useless with an unshared network) and its readiness wait
sleeps for a fixed time. Its ``Session`` is not used either: its message ids
are ``session_pid_counter`` (a cell could sign output for the next cell's id
before that cell existed) and its replay check remembers up to 65536
signatures per kernel. Here ids are 128 random bits; signatures are checked
(HMAC-SHA256, as the kernel expects); replays are pointless, since only the
running request's id is accepted and it is never reused.

What the cell's author can do, having read this and the key in the kernel's
memory: send anything on any channel. What it costs the runtime: see
``sandbox.zmtp`` (bounded bytes and time per connection). A message that is
not for the running request costs a substring search (no signature check, no
JSON); one for it is checked, decoded, validated field by field, and anything
of the wrong shape is dropped and counted, never raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandbox.output import OutputBudget, cap_line
from sandbox.result import CellError, strip_ansi
from sandbox.zmtp import Channel, Frames, WireLimits, raise_fd_limit

CHANNEL_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
DELIM = b"<IDS|MSG>"
# Once the reply (or the idle status) is in, the rest may take this long to
# come while iopub is silent. The idle status can be lost (the kernel's own
# send queue drops when full): this ends the cell anyway, soon. While iopub
# is still busy (a kernel slowly sending what the cell queued before its own
# output, gigabytes maybe, skipped unread) the cell stays open: a loaded
# machine can take seconds over it, and cutting it short would lose the
# output queued behind it. The cell's deadline bounds that wait.
QUIET_S = 0.25
# Finished requests whose stragglers are counted as late rather than stray.
RECENT = 8

Msg = dict[str, Any]

# JSON's \uD800-\uDFFF escapes decode to lone surrogates, which no encoder
# (the terminal's, pydantic's, a file's) accepts: a cell's output could
# otherwise crash whatever prints or records it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _scrub(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def write_connection_file(path: Path, ip_prefix: str, key: str) -> None:
    """Write a connection file whose sockets live at ``{ip_prefix}-{port}``.

    ``ip_prefix`` is the path as the kernel sees it, which differs from the
    runtime's view when the run dir is bound into a sandbox.
    """
    info: dict[str, str | int] = {
        "transport": "ipc",
        "ip": ip_prefix,
        "key": key,
        "signature_scheme": "hmac-sha256",
    }
    info.update(CHANNEL_PORTS)
    path.write_text(json.dumps(info))


def new_key() -> str:
    return secrets.token_hex(16)


def new_id() -> str:
    return secrets.token_hex(16)


class Collected:
    """What one execute request produced, and whether it is over."""

    def __init__(
        self,
        msg_id: str,
        budget: int,
        on_finished: Callable[[Collected], None],
        iopub_activity: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.msg_id = msg_id
        # How the id appears in a message's parent header (JSON).
        self.tag = json.dumps(msg_id).encode()
        self.out = OutputBudget(budget)
        # An error's text counts against the output limit too: its (at most
        # 2 * 20 + 3) lines share a quarter of it, each with room for the
        # note of what was cut (~40 characters).
        self._line_cap = max(80, min(4000, budget // 4 // 43 - 50))
        self.error: CellError | None = None
        self.reply: dict[str, str] | None = None
        self.idle = False
        # Why a channel of the kernel broke the protocol while this ran (the kernel is replaced).
        self.broken: str | None = None
        # The kernel was replaced before this request ran (set by the Kernel).
        self.restarted = False
        # Whether anything came on iopub for this request (its "busy" status
        # always does): a reply with nothing on iopub means output is lost.
        self.heard = False
        self.dropped = 0
        self._loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self._on_finished = on_finished
        self._iopub_activity = iopub_activity
        self._settling_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def replied(self) -> bool:
        """Only the kernel's signed reply on shell, for this request, counts."""
        return self.reply is not None

    def finish(self) -> None:
        if self.finished.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        self.finished.set_result(None)
        self._on_finished(self)

    def _heard_from(self) -> None:
        if self.idle and self.replied:
            self.finish()
        elif (self.idle or self.replied) and self._timer is None:
            self._settling_since = self._loop.time()
            self._timer = self._loop.call_at(self._settling_since + QUIET_S, self._settle)

    def _settle(self) -> None:
        now = self._loop.time()
        quiet_until = max(self._settling_since, self._iopub_activity()) + QUIET_S
        if now >= quiet_until:
            self.finish()
        else:
            self._timer = self._loop.call_at(quiet_until, self._settle)

    def absorb(self, kind: str, content: Msg) -> bool:
        """Take one iopub message; False if its content has the wrong shape (dropped)."""
        if self.finished.done():
            return True
        self.heard = True
        if kind == "stream":
            text = content.get("text")
            if not isinstance(text, str):
                return False
            target = self.out.stderr if content.get("name") == "stderr" else self.out.stdout
            target.add(text)
        elif kind in ("execute_result", "display_data"):
            data = content.get("data")
            if not isinstance(data, dict):
                return False
            text = data.get("text/plain")
            if text is not None:
                if not isinstance(text, str):
                    return False
                self.out.add_display(text)
        elif kind == "error":
            error = _error(content, self._line_cap)
            if error is None:
                return False
            self.error = error
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True
        self._heard_from()
        return True

    def take_reply(self, kind: str, content: Msg) -> bool:
        """Take one shell message; False if it is the reply and has the wrong shape."""
        if kind != "execute_reply" or self.finished.done():
            return True
        status = content.get("status")
        if not isinstance(status, str):
            return False
        reply = {"status": status}
        for key in ("ename", "evalue"):
            value = content.get(key)
            if isinstance(value, str):
                reply[key] = cap_line(value, self._line_cap)
        self.reply = reply
        self._heard_from()
        return True

    def break_off(self, why: str) -> None:
        """A channel broke the protocol: the cell is over, its kernel is to be replaced."""
        if self.broken is None:
            self.broken = why
        self.finish()


def _error(content: Msg, cap: int = 4000) -> CellError | None:
    ename, evalue, tb = content.get("ename"), content.get("evalue"), content.get("traceback", [])
    if not isinstance(ename, str) or not isinstance(evalue, str) or not isinstance(tb, list):
        return None
    if not all(isinstance(line, str) for line in tb):
        return None
    return CellError(
        ename=cap_line(ename, cap),
        evalue=cap_line(evalue, cap),
        traceback=_cap_traceback([cap_line(strip_ansi(line), cap) for line in tb]),
    )


def _cap_traceback(lines: list[str], keep: int = 20) -> list[str]:
    """Deep recursion yields thousands of identical frames: keep both ends."""
    if len(lines) <= 2 * keep:
        return lines
    return [*lines[:keep], f"... [{len(lines) - 2 * keep} traceback entries omitted] ...\n", *lines[-keep:]]


class KernelClient:
    def __init__(self, ip_prefix: str, key: str, limits: WireLimits | None = None) -> None:
        raise_fd_limit()
        limits = limits or WireLimits()
        self._mac = hmac.new(key.encode(), digestmod=hashlib.sha256)
        self._session = new_id()
        # late: output of a finished request; stray: for no request of ours;
        # unparented: for no request at all (the kernel's own notices);
        # malformed: bad signature, JSON or shape; protocol_errors (a limit
        # broken: the kernel is replaced), reconnects: the connections' story.
        self.counts: Counter[str] = Counter()
        self._current: Collected | None = None
        self._recent: deque[bytes] = deque(maxlen=RECENT)
        # Requests other than cells (the handshake's kernel_info, interrupts):
        # their status messages on iopub are not news.
        self._aside: deque[bytes] = deque(maxlen=RECENT)
        self._probe_replied: asyncio.Future[None] | None = None
        self._probe_heard: asyncio.Future[None] | None = None
        self.closed = False

        def channel(
            port: str, kind: bytes, on_msg: Callable[[Frames], None], on_broken: Callable[[str], None]
        ) -> Channel:
            return Channel(
                f"{ip_prefix}-{CHANNEL_PORTS[port]}",
                kind,
                on_msg,
                on_broken,
                self.counts,
                limits,
                kind == b"SUB",
            )

        self.shell = channel("shell_port", b"DEALER", self._on_shell, self._on_broken)
        self.iopub = channel("iopub_port", b"SUB", self._on_iopub, self._on_broken)
        # Interrupt replies are of no use: control is never read after its handshake.
        self.control = channel("control_port", b"DEALER", _ignore, self._on_broken)
        self.control.want_reading(False)

    @property
    def broken(self) -> str | None:
        """Why a channel of this kernel broke the protocol (None: none did); the kernel is of no more use."""
        for ch in (self.shell, self.iopub, self.control):
            if ch.broken is not None:
                return f"{ch.path.rsplit('-', 1)[-1]}: {ch.broken}"
        return None

    def _on_broken(self, why: str) -> None:
        request = self._current
        if request is not None:
            request.break_off(self.broken or why)
        for fut in (self._probe_replied, self._probe_heard):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"the kernel broke the wire protocol: {why}"))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ch in (self.shell, self.iopub, self.control):
            ch.close()

    def _reading(self, wanted: bool) -> None:
        self.shell.want_reading(wanted)
        self.iopub.want_reading(wanted)

    # --- sending ------------------------------------------------------------

    def _send(self, channel: Channel, msg_type: str, content: Msg, msg_id: str | None = None) -> str:
        msg_id = msg_id or new_id()
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": "sandbox",
            "session": self._session,
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        }
        parts = [json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()]
        channel.send([DELIM, self._sign(parts), *parts])
        return msg_id

    def _sign(self, parts: Frames) -> bytes:
        mac = self._mac.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def send_interrupt(self) -> None:
        self._aside.append(json.dumps(self._send(self.control, "interrupt_request", {})).encode())

    def execute(self, code: str, budget: int, silent: bool = False) -> Collected:
        """Send one execute request; its output is gathered until ``finished``.

        ``silent``: not counted or kept in the kernel's history (the liveness probe).
        """
        previous = self._current
        if previous is not None:
            previous.finish()
        request = Collected(new_id(), budget, self._finished, lambda: self.iopub.last_activity)
        self._current = request
        if self.broken is not None:
            request.break_off(self.broken)
            return request
        self._reading(True)
        content = {
            "code": code,
            "silent": silent,
            "store_history": not silent,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        self._send(self.shell, "execute_request", content, request.msg_id)
        return request

    def _finished(self, request: Collected) -> None:
        if self._current is request:
            self._current = None
            self._recent.append(request.tag)
            self._reading(False)

    # --- the readiness handshake ----------------------------------------------

    async def handshake(self) -> None:
        """Return once the kernel answers on shell AND we receive its iopub messages.

        A reply on shell alone is not enough: until our iopub subscription has
        reached the kernel, what it publishes (the first cell's output) is lost.
        One kernel_info request waits, queued, until the kernel is up; then
        iopub must show that our subscription arrived: the kernel's
        ``iopub_welcome`` (sent when a subscription reaches it, ipykernel >= 7)
        or the iopub status of one of our requests, which are repeated until
        one arrives. The caller bounds the total time.
        """
        loop = asyncio.get_running_loop()
        self._probe_replied = loop.create_future()
        self._probe_heard = loop.create_future()
        self._reading(True)
        try:
            self._probe()
            await self._probe_replied
            while not self._probe_heard.done():
                await asyncio.wait({self._probe_heard}, timeout=0.05)
                if not self._probe_heard.done():
                    self._probe()
        finally:
            self._probe_replied = self._probe_heard = None
            if self._current is None:
                self._reading(False)

    def _probe(self) -> None:
        self._aside.append(json.dumps(self._send(self.shell, "kernel_info_request", {})).encode())

    def _aside_from_cells(self, parent: bytes) -> bool:
        return any(tag in parent for tag in self._aside)

    # --- receiving ------------------------------------------------------------

    def _open(self, frames: Frames) -> tuple[str, Msg, Msg, bytes] | None:
        """(msg_type, parent header, content, raw parent) of a signed, well-formed message."""
        try:
            at = frames.index(DELIM)
        except ValueError:
            return None
        if len(frames) < at + 6:
            return None
        sig, header, parent, metadata, content = frames[at + 1 : at + 6]
        mac = self._mac.copy()
        for part in (header, parent, metadata, content):
            mac.update(part)
        if not hmac.compare_digest(mac.hexdigest().encode(), sig):
            return None
        try:
            h, p, c = json.loads(header), json.loads(parent), json.loads(content)
            if _SURROGATE_ESCAPE.search(content):
                c = _scrub(c)
        except (ValueError, RecursionError):
            return None
        if not (isinstance(h, dict) and isinstance(p, dict) and isinstance(c, dict)):
            return None
        kind = h.get("msg_type")
        if not isinstance(kind, str):
            return None
        return kind, p, c, parent

    def _mine(self, frames: Frames) -> Collected | None:
        """The running request, if this message names it (a cheap look before any real work)."""
        request = self._current
        if request is None:
            return None
        try:
            at = frames.index(DELIM)
        except ValueError:
            return None
        if len(frames) > at + 3 and request.tag in frames[at + 3]:
            return request
        return None

    def _elsewhere(self, frames: Frames) -> None:
        """A message not for the running request: count it, touch nothing else."""
        if self._probe_replied is not None:
            self._handshake_message(frames)
            return
        try:
            parent = frames[frames.index(DELIM) + 3]
        except (ValueError, IndexError):
            self.counts["malformed"] += 1
            return
        if any(tag in parent for tag in self._recent):
            self.counts["late"] += 1
        elif parent == b"{}":
            # The kernel's own notices (starting, iopub_welcome), or a cell's forgeries of them.
            self.counts["unparented"] += 1
        elif not self._aside_from_cells(parent):
            self.counts["stray"] += 1

    def _handshake_message(self, frames: Frames) -> None:
        opened = self._open(frames)
        if opened is None:
            self.counts["malformed"] += 1
            return
        kind, _, _, parent = opened
        for fut, hit in (
            (self._probe_replied, kind == "kernel_info_reply" and self._aside_from_cells(parent)),
            (
                self._probe_heard,
                kind == "iopub_welcome" or (kind == "status" and self._aside_from_cells(parent)),
            ),
        ):
            if hit and fut is not None and not fut.done():
                fut.set_result(None)

    def _on_iopub(self, frames: Frames) -> None:
        self._take(frames, Collected.absorb)

    def _on_shell(self, frames: Frames) -> None:
        self._take(frames, Collected.take_reply)

    def _take(self, frames: Frames, take: Callable[[Collected, str, Msg], bool]) -> None:
        request = self._mine(frames)
        if request is None:
            self._elsewhere(frames)
            return
        opened = self._open(frames)
        if (
            opened is None
            or opened[1].get("msg_id") != request.msg_id
            or not take(request, opened[0], opened[2])
        ):
            self.counts["malformed"] += 1
            request.dropped += 1

def _ignore(frames: Frames) -> None:
    return None
