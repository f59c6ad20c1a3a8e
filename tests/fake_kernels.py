"""Many minimal Jupyter kernels in one process, for testing the runtime's side at scale.

    python tests/fake_kernels.py DIR N KEY

Binds, for each i < N, the shell (ROUTER), iopub (XPUB) and control (ROUTER)
sockets of kernel i at ``DIR/k{i}-{port}`` (ipykernel's ipc layout, real
libzmq), prints ``ready``, and answers kernel_info and execute requests as
ipykernel does (busy, output, reply, idle; ``iopub_welcome`` on subscription).
An execute request's output is ``k{i}`` on stdout. Real kernels cost ~15 MB
each; this costs a few KB, so a test can hold more than a thousand.
"""

from __future__ import annotations

import resource
import sys

import zmq
from jupyter_client.session import Session


def main(folder: str, n: int, key: str) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = zmq.Context()
    # Three sockets per kernel, past libzmq's default of 1023 per context.
    ctx.set(zmq.MAX_SOCKETS, 3 * n + 64)
    session = Session(key=key.encode(), signature_scheme="hmac-sha256")
    poller = zmq.Poller()
    owner: dict[zmq.Socket[bytes], tuple[int, zmq.Socket[bytes]]] = {}
    for i in range(n):
        shell, iopub, control = ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB), ctx.socket(zmq.ROUTER)
        for sock, port in ((shell, 1), (iopub, 2), (control, 4)):
            sock.linger = 0
            sock.bind(f"ipc://{folder}/k{i}-{port}")
        poller.register(shell, zmq.POLLIN)
        poller.register(iopub, zmq.POLLIN)
        owner[shell] = (i, iopub)
        owner[iopub] = (i, iopub)
    print("ready", flush=True)
    while True:
        for sock, _ in poller.poll():
            i, iopub = owner[sock]
            frames = sock.recv_multipart()
            if sock is iopub:
                if frames[0][:1] == b"\x01":
                    welcome = session.msg("iopub_welcome", {"subscription": ""})
                    session.send(iopub, welcome)
                continue
            idents, parts = session.feed_identities(frames)
            request = session.deserialize(parts)
            kind = request["header"]["msg_type"]
            session.send(iopub, "status", {"execution_state": "busy"}, parent=request, ident=b"status")
            if kind == "execute_request":
                session.send(
                    iopub, "stream", {"name": "stdout", "text": f"k{i}"}, parent=request, ident=b"stream"
                )
                session.send(sock, "execute_reply", {"status": "ok"}, parent=request, ident=idents)
            elif kind == "kernel_info_request":
                session.send(sock, "kernel_info_reply", {"status": "ok"}, parent=request, ident=idents)
            session.send(iopub, "status", {"execution_state": "idle"}, parent=request, ident=b"status")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
