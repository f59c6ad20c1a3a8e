"""A minimal asyncio Jupyter client over the ipc transport.

jupyter_client's KernelManager is not used: it launches with TCP ports (racy
under concurrency, useless with an unshared network) and its readiness wait
sleeps for a fixed time. Messages are still built and signed by
``jupyter_client.session.Session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from sandbox.output import OutputBudget
from sandbox.result import CellError, strip_ansi

CHANNEL_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}

Msg = dict[str, Any]


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


class Collected:
    """What a cell produced, gathered from iopub and the shell reply."""

    def __init__(self, budget: int) -> None:
        self.out = OutputBudget(budget)
        self.error: CellError | None = None
        self.idle = False
        self.reply: Msg | None = None


class KernelClient:
    def __init__(self, ip_prefix: str, key: str) -> None:
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256", username="sandbox")
        ctx = zmq.asyncio.Context.instance()
        self._sockets: list[zmq.asyncio.Socket] = []

        def sock(kind: int, port: int) -> zmq.asyncio.Socket:
            s = ctx.socket(kind)
            s.linger = 0
            # The kernel binds a few ms after we connect; the default 100 ms
            # reconnect interval would dominate start-up.
            s.setsockopt(zmq.RECONNECT_IVL, 5)
            s.connect(f"ipc://{ip_prefix}-{port}")
            self._sockets.append(s)
            return s

        self.shell = sock(zmq.DEALER, CHANNEL_PORTS["shell_port"])
        self.control = sock(zmq.DEALER, CHANNEL_PORTS["control_port"])
        self.iopub = sock(zmq.SUB, CHANNEL_PORTS["iopub_port"])
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self._sockets:
            s.close(linger=0)

    def _send(self, socket: zmq.asyncio.Socket, msg_type: str, content: Msg) -> str:
        msg = self.session.msg(msg_type, content=content)
        self.session.send(socket, msg)
        return str(msg["header"]["msg_id"])

    async def _recv(self, socket: zmq.asyncio.Socket) -> Msg:
        """The next well-formed, correctly signed message; anything else is dropped.

        User code can write garbage to the kernel's sockets (a forked kernel
        shares them), and that must not break the runtime's side.
        """
        while True:
            frames: list[bytes] = await socket.recv_multipart(copy=True)
            try:
                _, parts = self.session.feed_identities(frames, copy=True)
                msg: Msg = self.session.deserialize(parts, content=True, copy=True)
                if isinstance(msg.get("content"), dict) and isinstance(msg.get("parent_header"), dict):
                    return msg
            except Exception:
                continue

    async def handshake(self) -> None:
        """Return once the kernel answers on shell AND we receive its iopub messages.

        A reply on shell alone is not enough: until our iopub subscription has
        reached the kernel, what it publishes (the first cell's output) is lost.
        One kernel_info request waits, queued by zmq, until the kernel is up;
        then iopub must show that our subscription arrived: the kernel's
        ``iopub_welcome`` (sent when a subscription reaches it, ipykernel >= 7)
        or the iopub status of one of our requests, which are repeated until
        one arrives. The caller bounds the total time.
        """
        ids = {self._send(self.shell, "kernel_info_request", {})}
        while True:
            msg = await self._recv(self.shell)
            if msg["parent_header"].get("msg_id") in ids:
                break
        while not await self._iopub_saw(ids, 0.05):
            ids.add(self._send(self.shell, "kernel_info_request", {}))
        await self._drain(self.shell)

    async def _iopub_saw(self, ids: set[str], wait: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while True:
            left = end - loop.time()
            if left <= 0:
                return False
            if not await self.iopub.poll(timeout=int(left * 1000) + 1):
                return False
            msg = await self._recv(self.iopub)
            if msg["parent_header"].get("msg_id") in ids or msg["header"].get("msg_type") == "iopub_welcome":
                return True

    async def _drain(self, socket: zmq.asyncio.Socket) -> None:
        while await socket.poll(timeout=0):
            await socket.recv_multipart()

    def send_interrupt(self) -> None:
        self._send(self.control, "interrupt_request", {})

    def send_execute(self, code: str) -> str:
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        return self._send(self.shell, "execute_request", content)

    async def collect(self, msg_id: str, into: Collected) -> None:
        """Gather the iopub output and shell reply of one request, until idle."""
        # Re-entrant: after a timeout the caller interrupts and calls again with
        # the same ``into``, so nothing gathered so far is lost.
        reply_task = asyncio.ensure_future(self._reply(msg_id, into))
        try:
            while not into.idle:
                msg = await self._recv(self.iopub)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                self._absorb(msg, into)
            await reply_task
        finally:
            if not reply_task.done():
                reply_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reply_task

    async def _reply(self, msg_id: str, into: Collected) -> None:
        while into.reply is None:
            msg = await self._recv(self.shell)
            if msg["parent_header"].get("msg_id") == msg_id:
                into.reply = msg

    @staticmethod
    def _absorb(msg: Msg, into: Collected) -> None:
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind == "stream":
            target = into.out.stderr if content.get("name") == "stderr" else into.out.stdout
            target.add(str(content.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text is not None:
                into.out.add_display(str(text))
        elif kind == "error":
            into.error = CellError(
                ename=str(content.get("ename", "")),
                evalue=str(content.get("evalue", "")),
                traceback=_cap_traceback([strip_ansi(str(line)) for line in content.get("traceback", [])]),
            )
        elif kind == "status" and content.get("execution_state") == "idle":
            into.idle = True


def _cap_traceback(lines: list[str], keep: int = 20) -> list[str]:
    """Deep recursion yields thousands of identical frames: keep both ends."""
    if len(lines) <= 2 * keep:
        return lines
    return [*lines[:keep], f"... [{len(lines) - 2 * keep} traceback entries omitted] ...\n", *lines[-keep:]]
