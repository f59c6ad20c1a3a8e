"""`tora sandbox serve` as the stacks that call it see it: the real server in a child process on
127.0.0.1, called with SandboxFusion's official client (`sandbox-fusion` from PyPI) and with
NeMo-Skills' request shapes (its `LocalSandbox._prepare_request` and headers) through httpx.
Kernels are the real sandboxed pool kernels."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner
from conftest import alive, descendants

from tora.cli.main import cli
from tora.errors import UsageError
from tora.serve.process import SandboxServeProcess

KEY = "sandbox-key-0123456789"


def nemo_request(code: str, timeout: float = 10.0, language: str = "ipython", std_input: str = "",
                 max_output_characters: int = 1000) -> dict[str, Any]:
    """What NeMo-Skills' LocalSandbox._prepare_request sends."""
    return {"generated_code": code, "std_input": std_input, "timeout": timeout, "language": language,
            "max_output_characters": max_output_characters, "traceback_verbosity": "Plain"}


class Nemo:
    """NeMo-Skills' calls: POST /execute with X-Session-ID, DELETE /sessions/{id}."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.http = httpx.Client(base_url=url, headers=headers or {}, timeout=60)

    def execute(self, session: str | None, code: str, timeout: float = 10.0, **kw: Any) -> httpx.Response:
        headers = {"Content-Type": "application/json", **({"X-Session-ID": session} if session else {})}
        return self.http.post("/execute", json=nemo_request(code, timeout, **kw), headers=headers,
                              timeout=timeout + 30)

    def run(self, session: str | None, code: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any]:
        r = self.execute(session, code, timeout, **kw)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert set(body) == {"process_status", "stdout", "stderr", "new_session_created"}, body
        return body



def stop_and_check(proc: SandboxServeProcess) -> None:
    tree = descendants(proc.pid)
    assert proc.stop() == 0, "".join(proc.stderr)
    deadline = time.monotonic() + 15
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(tree), f"left running after shutdown: {alive(tree)}"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServeProcess]:
    proc = SandboxServeProcess(["--timeout", "10", "--max-body-bytes", "65536", "--max-sessions", "16", "--concurrency", "4",
                                "--max-timeout", "60"])
    with proc:
        yield proc
        stop_and_check(proc)


@pytest.fixture(scope="module")
def nemo(server: SandboxServeProcess) -> Nemo:
    return Nemo(server.url)


def sid() -> str:
    return str(uuid.uuid4())


# --- SandboxFusion, through its official client -------------------------------------


def run_code(server: SandboxServeProcess, **kw: Any) -> Any:
    from sandbox_fusion import RunCodeRequest, run_code

    return run_code(RunCodeRequest(language="python", **kw), endpoint=server.url, max_attempts=1)


def test_run_code_official_client(server: SandboxServeProcess) -> None:
    from sandbox_fusion import RunStatus

    r = run_code(server, code="print(1 + 1)")
    assert r.status == RunStatus.Success, r
    assert r.run_result.stdout == "2\n" and r.run_result.return_code == 0
    assert r.run_result.execution_time is not None and r.run_result.execution_time > 0
    # A script does not echo its last expression.
    assert run_code(server, code="1 + 1").run_result.stdout == ""
    # Each request gets a fresh kernel: nothing carries over.
    run_code(server, code="leak = 1")
    r = run_code(server, code="print(leak)")
    assert r.status == RunStatus.Failed and "NameError" in r.run_result.stderr


def test_run_code_errors_exit_codes_and_deadline(server: SandboxServeProcess) -> None:
    from sandbox_fusion import CommandRunStatus, RunStatus

    r = run_code(server, code="print('before')\nraise ValueError('boom')")
    assert r.status == RunStatus.Failed
    assert r.run_result.return_code == 1 and r.run_result.stdout == "before\n"
    assert "ValueError: boom" in r.run_result.stderr
    assert run_code(server, code="import sys\nsys.exit(3)").run_result.return_code == 3
    ok = run_code(server, code="import sys\nprint('x')\nsys.exit(0)")
    assert ok.status == RunStatus.Success and ok.run_result.return_code == 0, ok
    t0 = time.monotonic()
    r = run_code(server, code="while True: pass", run_timeout=1)
    assert r.status == RunStatus.Failed and r.run_result.status == CommandRunStatus.TimeLimitExceeded
    assert time.monotonic() - t0 < 10
    died = run_code(server, code="import os\nos._exit(0)")
    assert died.status == RunStatus.Failed and died.run_result.return_code == -9


def test_run_code_files_stdin_and_fetch(server: SandboxServeProcess) -> None:
    from sandbox_fusion import RunStatus

    code = (
        "text = open('data/in.txt').read()\n"
        "a = input()\nb = input()\n"
        "open('out.txt', 'w').write(text.upper() + a + b)\n"
        "try:\n    input()\nexcept EOFError:\n    print('eof')\n"
    )
    r = run_code(server, code=code, stdin="1\n2\n",
                 files={"data/in.txt": base64.b64encode(b"hello ").decode()},
                 fetch_files=["out.txt", "missing.txt"])
    assert r.status == RunStatus.Success, r
    assert r.run_result.stdout == "eof\n"
    assert base64.b64decode(r.files["out.txt"]) == b"HELLO 12"
    assert "missing.txt" not in r.files


def test_run_code_memory_limit(server: SandboxServeProcess) -> None:
    from sandbox_fusion import RunStatus

    code = "x = b'x' * (300 << 20)\nprint(len(x) >> 20)"
    assert run_code(server, code=code).run_result.stdout == "300\n"
    r = httpx.post(f"{server.url}/run_code", json={"code": code, "language": "python", "memory_limit_MB": 128},
                   timeout=60).json()
    if "not applied" in r["message"]:  # no memory cgroup on this machine: said, not claimed
        assert r["run_result"]["stdout"] == "300\n"
        return
    assert r["status"] == RunStatus.Failed and r["run_result"]["stdout"] == "", r


def test_run_jupyter_official_client(server: SandboxServeProcess) -> None:
    from sandbox_fusion import RunJupyterRequest, RunStatus, run_jupyter

    cells = ["a = 123", "a", "print(a)", "import sys; sys.stderr.write('stderr message')",
             "raise RuntimeError('error message')"]
    r = run_jupyter(RunJupyterRequest(cells=cells), endpoint=server.url, max_attempts=1)
    assert r.status == RunStatus.Success, r
    assert r.cells[1].display == [{"text/plain": "123"}]
    assert r.cells[2].stdout == "123\n"
    assert r.cells[3].stderr == "stderr message"
    assert r.cells[4].error[0]["ename"] == "RuntimeError" and r.cells[4].error[0]["evalue"] == "error message"


def test_run_jupyter_deadline(server: SandboxServeProcess) -> None:
    body = {"cells": ["x = 1", "while True: pass", "print('never')"], "cell_timeout": 1, "total_timeout": 30}
    r = httpx.post(f"{server.url}/run_jupyter", json=body, timeout=60).json()
    assert r["status"] == "Failed" and r["driver"]["status"] == "TimeLimitExceeded"
    assert len(r["cells"]) == 2 and "time limit" in r["message"]


# --- NeMo-Skills' shapes, with sessions ---------------------------------------------------


def test_sessions_keep_state_apart(nemo: Nemo) -> None:
    a, b = sid(), sid()
    first = nemo.run(a, "x = 5")
    # A session made by this request: NeMo-Skills' server says so too.
    assert first["process_status"] == "completed" and first["new_session_created"]
    r = nemo.run(a, "print(x)\nx * 2")
    assert r == {"process_status": "completed", "stdout": "5\n10\n", "stderr": "", "new_session_created": False}
    other = nemo.run(b, "print(x)")
    assert other["process_status"] == "error" and "NameError" in other["stdout"]
    cut = nemo.run(a, "print('y' * 5000)", max_output_characters=100)
    assert cut["stdout"] == "y" * 100 + "<output cut>"
    listed = nemo.http.get("/sessions").json()["sessions"]
    assert a in listed and b in listed
    assert nemo.http.delete(f"/sessions/{a}").status_code == 200
    gone = nemo.http.delete(f"/sessions/{a}")
    assert gone.status_code == 404 and "no session" in gone.json()["error"]
    # The id names a new session now: its state is gone, and the answer says so.
    again = nemo.run(a, "print(x)")
    assert again["new_session_created"] and "NameError" in again["stdout"]
    nemo.http.delete(f"/sessions/{a}")
    nemo.http.delete(f"/sessions/{b}")


def test_timeout_stops_the_cell_and_the_next_runs_at_once(nemo: Nemo) -> None:
    s = sid()
    nemo.run(s, "keep = 'kept'")
    t0 = time.monotonic()
    nemo.run(s, "print(keep)")
    control_s = time.monotonic() - t0
    t0 = time.monotonic()
    r = nemo.run(s, "while True: pass", timeout=2)
    timed = time.monotonic() - t0
    assert r["process_status"] == "timeout" and "timed out after 2 seconds" in r["stderr"]
    assert not r["new_session_created"] and timed < 2 + 5
    t0 = time.monotonic()
    after = nemo.run(s, "print(keep)")
    # The interrupted cell is over: the next one is not queued behind a still-running loop.
    assert after["stdout"] == "kept\n" and not after["new_session_created"]
    assert time.monotonic() - t0 < control_s + 1.5
    # A cell that swallows the interrupt: killed, replaced, and said so.
    stubborn = "import signal\nsignal.signal(signal.SIGINT, lambda *a: None)\nwhile True: pass"
    r = nemo.run(s, stubborn, timeout=1)
    assert r["process_status"] == "timeout" and r["new_session_created"] and "state lost" in r["stderr"]
    lost = nemo.run(s, "print(keep)")
    assert "NameError" in lost["stdout"] and not lost["new_session_created"]
    nemo.http.delete(f"/sessions/{s}")


def kernel_pid(nemo: Nemo, session: str) -> int:
    pid = nemo.http.get("/sessions").json()["sessions"][session]["kernel_pid"]
    assert isinstance(pid, int)
    return pid


def test_kernel_killed_mid_request_and_between_requests(nemo: Nemo) -> None:
    s = sid()
    nemo.run(s, "x = 1")
    pid = kernel_pid(nemo, s)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        pending = ex.submit(nemo.run, s, "import time\ntime.sleep(30)", 40)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        r = pending.result(timeout=30)
    assert r["process_status"] == "error" and r["new_session_created"], r
    assert "KernelDied" in r["stdout"]
    assert "NameError" in nemo.run(s, "print(x)")["stdout"]
    # Killed while idle: the next request finds a new kernel and says so.
    nemo.run(s, "y = 2")
    os.kill(kernel_pid(nemo, s), signal.SIGKILL)
    time.sleep(0.5)
    r = nemo.run(s, "print('fresh')")
    assert r["stdout"] == "fresh\n" and r["new_session_created"], r
    nemo.http.delete(f"/sessions/{s}")


def test_one_session_in_order_sessions_in_parallel(nemo: Nemo) -> None:
    a, b = sid(), sid()
    nemo.run(a, "order = []\nimport time")
    nemo.run(b, "import time")
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        slow = ex.submit(nemo.run, a, "time.sleep(1.5); order.append('slow')")
        time.sleep(0.3)
        fast = ex.submit(nemo.run, a, "order.append('fast')")
        t0 = time.monotonic()
        other = ex.submit(nemo.run, b, "print('b')")
        other.result()
        other_s = time.monotonic() - t0
        slow.result()
        fast.result()
        fast_done = time.monotonic() - t0
    # The other session did not wait for session a's slow cell; a's second cell did.
    assert other_s < fast_done
    assert nemo.run(a, "print(order)")["stdout"] == "['slow', 'fast']\n"
    nemo.http.delete(f"/sessions/{a}")
    nemo.http.delete(f"/sessions/{b}")


def test_stateless_python_language_with_stdin(nemo: Nemo) -> None:
    r = nemo.run(None, "print(int(input()) * 2)", language="python", std_input="21\n")
    assert r["stdout"] == "42\n" and r["process_status"] == "completed"


# --- fork ------------------------------------------------------------------------


def fork(nemo: Nemo, session: str) -> dict[str, Any]:
    r = nemo.http.post(f"/sessions/{session}/fork")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["session_id"] != session
    return body


def test_fork_copies_state_into_a_separate_session(nemo: Nemo) -> None:
    s = sid()
    nemo.run(s, "import random\nrandom.seed(7)\nx = [1, 2]\nopen('f.txt', 'w').write('on disk')")
    nemo.run(s, "class Box:\n    def __init__(self, v):\n        self.v = v\nsquare = lambda n: Box(n * n)\nb = square(3)")
    forked = fork(nemo, s)
    new = forked["session_id"]
    # A copy of the state, not a re-run: the random generator is where the source's is.
    assert forked["method"] == "snapshot", forked
    assert nemo.run(new, "print(random.random())")["stdout"] == nemo.run(s, "print(random.random())")["stdout"]
    r = nemo.run(new, "x.append(3)\nprint(x, b.v, square(4).v, open('f.txt').read())")
    assert r["stdout"] == "[1, 2, 3] 9 16 on disk\n" and not r["new_session_created"]
    nemo.run(new, "open('f.txt', 'w').write('changed')")
    # The two are apart: own kernel, own sandbox, own files.
    assert nemo.run(s, "print(x, open('f.txt').read())")["stdout"] == "[1, 2] on disk\n"
    assert kernel_pid(nemo, new) != kernel_pid(nemo, s)
    if os.geteuid() == 0:  # a root runtime gives every kernel a host uid of its own
        uids = {psutil.Process(kernel_pid(nemo, x)).uids().real for x in (s, new)}
        assert len(uids) == 2 and 0 not in uids, uids
    # A fork of a fork.
    again = fork(nemo, new)
    assert nemo.run(again["session_id"], "print(x)")["stdout"] == "[1, 2, 3]\n"
    missing = nemo.http.post(f"/sessions/{sid()}/fork")
    assert missing.status_code == 404 and "error" in missing.json()
    for name in (s, new, again["session_id"]):
        nemo.http.delete(f"/sessions/{name}")


def test_fork_falls_back_to_replay_and_says_why(nemo: Nemo) -> None:
    s = sid()
    nemo.run(s, "import random, threading, time\nx = 41")
    nemo.run(s, "print(random.random())")
    nemo.run(s, "t = threading.Thread(target=time.sleep, args=(30,), daemon=True)\nt.start()\nx += 1")
    forked = fork(nemo, s)
    assert forked["method"] == "replay" and "threads" in forked["reason"], forked
    # Re-run in order; the random cell came out differently, and the answer names it.
    assert forked["replayed"] == 3 and forked["diverged"] == [1]
    assert nemo.run(forked["session_id"], "print(x)")["stdout"] == "42\n"
    # What cannot be pickled is named too.
    other = sid()
    nemo.run(other, "g = (i for i in range(3))\ny = 1")
    forked = fork(nemo, other)
    assert forked["method"] == "replay" and "cannot be copied" in forked["reason"], forked
    assert nemo.run(forked["session_id"], "print(y, next(g))")["stdout"] == "1 0\n"
    for name in (s, other):
        nemo.http.delete(f"/sessions/{name}")


# --- hostile cells, concurrently, through the service -----------------------------------

HOSTILE = {
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "x = bytearray(8 * 1024**3)",
    "gradual memory": "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))",
    "sigint ignored": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
    "huge stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "kill everything": "import os, signal\nfor pid in range(1, 5000):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                       "    except OSError:\n        pass",
    "exit": "import os\nos._exit(1)",
    "host files": "print(open('/etc/shadow').read())",
}


def test_hostile_cells_in_concurrent_sessions_are_contained(server: SandboxServeProcess, nemo: Nemo) -> None:
    control = sid()
    nemo.run(control, "alive = 'yes'")
    sessions = {name: sid() for name in HOSTILE}
    with concurrent.futures.ThreadPoolExecutor(len(HOSTILE)) as ex:
        futures = {name: ex.submit(nemo.execute, sessions[name], code, 3) for name, code in HOSTILE.items()}
        time.sleep(1)
        # Another session keeps its state and answers while they run.
        during = nemo.run(control, "print(alive)")
        answers = {name: f.result(timeout=60) for name, f in futures.items()}
    assert during["stdout"] == "yes\n" and not during["new_session_created"]
    for name, r in answers.items():
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        # A pool kernel is its namespace's init: the SIGKILLs it sends reach nothing but its own
        # processes, and it ignores its own; every other cell ends in an error or a timeout.
        ends = ("completed",) if name == "kill everything" else ("error", "timeout")
        assert body["process_status"] in ends, (name, body)
        assert len(body["stdout"]) <= 1000 + len("<output cut>")
        # Each hostile session still works afterwards (in a replaced kernel where it had to be).
        assert nemo.run(sessions[name], "print(6 * 7)")["stdout"] == "42\n", name
        nemo.http.delete(f"/sessions/{sessions[name]}")
    assert nemo.run(control, "print(alive)")["stdout"] == "yes\n"
    assert httpx.get(f"{server.url}/health").json()["status"] == "healthy"
    nemo.http.delete(f"/sessions/{control}")


# --- bad input: the format's own 4xx, never a 500, never a dead server ----------------


def test_bad_input_answers_in_each_format(server: SandboxServeProcess, nemo: Nemo) -> None:
    url = server.url
    post = httpx.Client(base_url=url, timeout=30).post
    cases = [
        # SandboxFusion: FastAPI's {"detail": [...]} naming the field, 422.
        ("/run_code", b"{not json", {}, 422, "json_invalid"),
        ("/run_code", b"[1, 2]", {}, 422, "dictionary"),
        ("/run_code", {"code": "print(1)", "language": "brainfuck"}, {}, 422, "language"),
        ("/run_code", {"code": "print(1)", "language": "cpp"}, {}, 422, "language"),
        ("/run_code", {"code": "print(1)", "language": "python", "run_timeout": -1}, {}, 422, "run_timeout"),
        ("/run_code", {"code": "print(1)", "language": "python", "run_timeout": 1e9}, {}, 422, "run_timeout"),
        ("/run_code", {"language": "python"}, {}, 422, "code"),
        ("/run_code", {"code": "1", "language": "python", "files": {"../x": "aGk="}}, {}, 422, "files"),
        ("/run_jupyter", {"cells": "print(1)"}, {}, 422, "cells"),
        ("/run_jupyter", {"cells": ["1"], "total_timeout": -5}, {}, 422, "total_timeout"),
        # NeMo-Skills: {"error": ...}, 400.
        ("/execute", b"{not json", {"X-Session-ID": "s"}, 400, "not valid JSON"),
        ("/execute", {"timeout": 1}, {"X-Session-ID": "s"}, 400, "generated_code"),
        ("/execute", nemo_request("print(1)", timeout=-1), {"X-Session-ID": "s"}, 400, "timeout"),
        ("/execute", nemo_request("print(1)", language="lean4"), {"X-Session-ID": "s"}, 400, "language"),
        ("/execute", nemo_request("print(1)"), {}, 400, "X-Session-ID"),
    ]
    for path, body, headers, status, names in cases:
        r = (post(path, content=body, headers=headers) if isinstance(body, bytes)
             else post(path, json=body, headers=headers))
        assert r.status_code == status, (path, body, r.status_code, r.text)
        if path == "/execute":
            assert set(r.json()) == {"error"} and names in r.json()["error"], (body, r.text)
        else:
            detail = r.json()["detail"]
            assert isinstance(detail, list) and names in str(detail), (body, r.text)
    big = b'{"code": "' + b"x" * 70_000 + b'", "language": "python"}'
    assert post("/run_code", content=big).status_code == 413
    too_big = post("/execute", content=big, headers={"X-Session-ID": "s"})
    assert too_big.status_code == 413 and "larger" in too_big.json()["error"]
    assert httpx.delete(f"{url}/sessions/nope").json() == {"error": "no session 'nope' (never created, deleted, or expired)"}
    assert httpx.get(f"{url}/nowhere").status_code == 404
    # Still serving.
    assert nemo.run(None, "print('up')", language="python")["stdout"] == "up\n"


# --- limits: sessions cap, expiry, API key ---------------------------------------------


def test_session_cap_expiry_and_api_key() -> None:
    with SandboxServeProcess(["--max-sessions", "2", "--session-ttl", "2", "--api-key", KEY]) as proc:
        try:
            assert httpx.get(f"{proc.url}/health").status_code == 200  # never behind the key
            denied = httpx.post(f"{proc.url}/execute", json=nemo_request("1"), headers={"X-Session-ID": "a"})
            assert denied.status_code == 401 and "API key" in denied.json()["error"]
            denied = httpx.post(f"{proc.url}/run_code", json={"code": "1", "language": "python"})
            assert denied.status_code == 401 and "API key" in denied.json()["detail"]
            nemo = Nemo(proc.url, headers={"Authorization": f"Bearer {KEY}"})
            nemo.run("a", "x = 1")
            nemo.run("b", "x = 2")
            full = nemo.execute("c", "x = 3")
            assert full.status_code == 429 and "sessions" in full.json()["error"]
            assert 1 <= int(full.headers["Retry-After"]) <= 2
            busy_fork = nemo.http.post("/sessions/a/fork")
            assert busy_fork.status_code == 429
            # Both expire while idle; their ids then name new, empty sessions.
            time.sleep(2 + 1.5)
            assert nemo.http.get("/health").json()["sessions"] == 0
            r = nemo.run("a", "print(x)")
            assert r["new_session_created"] and "NameError" in r["stdout"]
            assert nemo.run("c", "print('room')")["stdout"] == "room\n"
        finally:
            stop_and_check(proc)


def test_non_loopback_needs_a_key() -> None:
    r = CliRunner().invoke(cli, ["sandbox", "serve", "--host", "0.0.0.0", "--port", "0"], env={"TORA_API_KEY": ""})
    assert isinstance(r.exception, UsageError) and "--api-key" in str(r.exception)
