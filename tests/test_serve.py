"""`tora serve` as clients see it: the real server in a child process on 127.0.0.1,
called with the official OpenAI client and with raw HTTP. The model is a
replay of recorded trajectories (ToRA's released GSM8K rows and scripted
ones), re-executed by tora's sandboxed kernels; one test uses the embedded model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SURROGATE_CELL, TORA, alive, descendants, write_released

from tora.serve.process import ServeProcess

openai = pytest.importorskip("openai", reason="the tests call tora serve with the official openai client")

HEAD = Path(__file__).parent / "data" / "released_gsm8k_head.jsonl"
RELEASED = [json.loads(line) for line in HEAD.read_text().splitlines()[:3]]
KEY = "test-key-0123456789"
SLEEPY_Q = "How long is a nap? (the recorded code sleeps)"
TWICE_Q = "What is 2 + 3? (recorded twice)"
SURROGATE_Q = "What does a cell print with a lone surrogate?"


def says(n: int, pause: float = 0.0) -> str:
    sleep = f"import time; time.sleep({pause})\n" if pause else ""
    return f"Let me compute.\n```python\n{sleep}print({n})\n```\n```output\n{n}\n```\nSo the answer is $\\boxed{{{n}}}$."


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ToRA's first three GSM8K rows, a trajectory whose cell sleeps, one with two samples."""
    path = tmp_path_factory.mktemp("replay") / "served.jsonl"
    return write_released(path, [
        *RELEASED,
        {"idx": 100, "question": SLEEPY_Q, "code": [says(7, pause=60)]},
        {"idx": 101, "question": TWICE_Q, "code": [says(5), says(6)]},
        {"idx": 102, "question": SURROGATE_Q,
         "code": [f"Run it.\n```python\n{SURROGATE_CELL}```\n```output\n42\n```\nSo $\\boxed{{42}}$."]},
    ])



def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def server(recording: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    record = tmp_path_factory.mktemp("served") / "serve.jsonl"
    proc = ServeProcess(["--model", f"replay:{recording}", "--api-key", KEY, "--record-to", str(record),
                         "--timeout", "120", "--max-tokens-limit", "4096", "--max-body-bytes", "65536",
                         "--concurrency", "4"])
    proc.record = record  # type: ignore[attr-defined]
    with proc:
        yield proc
        tree = descendants(proc.pid)
        assert proc.stop() == 0, "".join(proc.stderr)
    assert not alive(tree), "kernel or worker processes outlived the server"


def client(server: ServeProcess, key: str = KEY) -> Any:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def health(server: ServeProcess) -> dict[str, Any]:
    return httpx.get(server.url.removesuffix("/v1") + "/health", timeout=30).json()  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)
    return time.monotonic() - t0


def record_for(server: ServeProcess, question: str, n: int = 1) -> list[dict[str, Any]]:
    path: Path = server.record  # type: ignore[attr-defined]
    wait_for(lambda: len([r for r in records(path) if r["problem"]["text"] == question]) >= n, 30)
    return [r for r in records(path) if r["problem"]["text"] == question]


# --- answers ------------------------------------------------------------------------


def test_completion_is_the_whole_interleaved_solution_with_its_trajectory(server: ServeProcess) -> None:
    row = RELEASED[0]
    out = client(server).completions.create(model="tora", prompt=row["question"])
    choice = out.choices[0]
    # The recorded completion, with its output block produced again by tora's kernel.
    assert choice.text == row["code"][0]
    assert choice.finish_reason == "stop" and out.object == "text_completion"
    trajectory = choice.model_extra["tora"]["trajectory"]
    assert trajectory["result"]["final_answer"] == row["gt"] and trajectory["result"]["finish"] == "answered"
    assert [s["type"] for s in trajectory["steps"]] == ["text", "code", "execution", "text"]
    assert out.usage.completion_tokens == trajectory["stats"]["completion_tokens"] > 0
    recorded = record_for(server, row["question"])[-1]
    assert recorded["id"] == trajectory["id"] and recorded["origin"] == "replayed"
    assert recorded["problem"]["source"] == "served" and recorded["problem"]["meta"]["endpoint"] == "/v1/completions"


def test_a_lone_surrogate_in_a_cells_output_is_served_and_recorded(server: ServeProcess) -> None:
    out = client(server).completions.create(model="tora", prompt=SURROGATE_Q)
    trajectory = out.choices[0].model_extra["tora"]["trajectory"]
    assert trajectory["steps"][2]["stdout"] == "a\ufffdb\n42\n", trajectory["steps"][2]
    assert trajectory["result"]["final_answer"] == "42"
    assert record_for(server, SURROGATE_Q)[-1]["steps"][2]["stdout"] == "a\ufffdb\n42\n"


def test_chat_completion_answers_the_last_user_message(server: ServeProcess) -> None:
    row = RELEASED[1]
    out = client(server).chat.completions.create(model="tora", messages=[
        {"role": "system", "content": "ignored: the server's prompt template is the system's"},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": row["question"]}]},
    ])
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == row["code"][0]
    assert out.choices[0].model_extra["tora"]["trajectory"]["problem"]["text"] == row["question"]


def test_stream_sends_rationale_code_and_output_as_they_happen(server: ServeProcess) -> None:
    row = RELEASED[2]
    stream = client(server).chat.completions.create(model="tora", messages=[{"role": "user", "content": row["question"]}],
                                                    stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == row["code"][0]
    assert len(contents) > 20, "streamed piece by piece, not in one block"
    assert chunks[0].choices[0].delta.role == "assistant"
    # The output block arrives as one chunk, marked, once its cell has run.
    marked = [c for c in chunks if c.choices and (c.choices[0].model_extra or {}).get("tora", {}) and
              "execution" in c.choices[0].model_extra["tora"]]
    assert len(marked) == 1 and marked[0].choices[0].model_extra["tora"]["execution"] == {"index": 1, "status": "ok"}
    output = marked[0].choices[0].delta.content
    assert output.startswith("```output\n") and output in row["code"][0]
    code_end = row["code"][0].index("```output")
    assert "".join(contents[: contents.index(output)]) == row["code"][0][:code_end], "the code came before its output"
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["tora"]["trajectory"]["result"]["finish"] == "answered"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_stream_concatenates_to_the_unstreamed_text(server: ServeProcess) -> None:
    row = RELEASED[0]
    pieces = [c.choices[0].text for c in client(server).completions.create(model="tora", prompt=row["question"],
                                                                           stream=True) if c.choices]
    assert "".join(pieces) == row["code"][0]


def test_stop_strings_cut_the_text_wherever_they_occur(server: ServeProcess) -> None:
    row = RELEASED[0]
    text = row["code"][0]
    marker = "eggs_left * price_per_egg"  # in the code, so in the model's own words
    out = client(server).completions.create(model="tora", prompt=row["question"], stop=[marker, "never there"])
    assert out.choices[0].text == text[: text.index(marker)] and out.choices[0].finish_reason == "stop"
    # In an output block (the kernel's text, not the model's): still cut, streamed or not.
    out = client(server).completions.create(model="tora", prompt=row["question"], stop="```output\n18")
    assert out.choices[0].text == text[: text.index("```output")]
    streamed = "".join(c.choices[0].text for c in client(server).completions.create(
        model="tora", prompt=row["question"], stop="```output\n18", stream=True) if c.choices)
    assert streamed == text[: text.index("```output")]


def test_request_fields_become_the_trajectory_settings(server: ServeProcess) -> None:
    row = RELEASED[1]
    out = client(server).completions.create(model="tora", prompt=row["question"], temperature=0.7, top_p=0.9,
                                            seed=11, max_tokens=12)
    trajectory = out.choices[0].model_extra["tora"]["trajectory"]
    sampling = trajectory["generation"]["sampling"]
    assert (sampling["temperature"], sampling["top_p"], sampling["seed"]) == (0.7, 0.9, 11)
    assert sampling["max_tokens"] == 12 and sampling["max_tokens_per_call"] == 12
    assert trajectory["result"]["finish"] == "max_tokens" and out.choices[0].finish_reason == "length"
    assert trajectory["stats"]["completion_tokens"] == 12
    assert len(out.choices[0].text) < len(row["code"][0])


def test_list_prompts_and_n_give_one_choice_each_in_order(server: ServeProcess) -> None:
    out = client(server).completions.create(model="tora", prompt=[RELEASED[0]["question"], RELEASED[1]["question"]])
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [RELEASED[0]["code"][0], RELEASED[1]["code"][0]]
    out = client(server).chat.completions.create(model="tora", n=2, seed=3, messages=[{"role": "user", "content": TWICE_Q}])
    assert [c.message.content for c in out.choices] == [says(5), says(6)]
    seeds = [c.model_extra["tora"]["trajectory"]["generation"]["sampling"]["seed"] for c in out.choices]
    samples = [c.model_extra["tora"]["trajectory"]["sample_index"] for c in out.choices]
    assert seeds == [3, 4] and samples == [0, 1]


def test_models_and_health(server: ServeProcess) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tora"]
    card = c.models.retrieve("tora")
    assert card.model_extra["tora"]["backend"] == "replay"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    state = health(server)  # no key needed
    assert state["status"] == "ok" and {"in_flight", "queued", "kernels_live"} <= state.keys()


# --- refusals -----------------------------------------------------------------------


def test_api_key_is_required_and_checked(server: ServeProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(server, key="wrong").models.list()
    assert wrong.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/completions", json={"model": "tora", "prompt": RELEASED[0]["question"]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "tora"}, 400, "prompt", "Field required"),
    ({"model": "tora", "prompt": [1, 2, 3]}, 400, "prompt", "token ids are not accepted"),
    ({"model": "tora", "prompt": ["x", {"a": 1}]}, 400, "prompt", "valid string"),
    ({"model": "tora", "prompt": "  "}, 400, "prompt", "empty"),
    ({"model": "tora", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens", "more than this server allows (4096)"),
    ({"model": "tora", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "tora", "prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": "tora", "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo", "loglikelihood"),
    ({"model": "tora", "prompt": "x", "logprobs": 5}, 400, "logprobs", "no log probabilities"),
    ({"model": "tora", "prompt": "x", "n": 17}, 400, "n", "more than 16 choices"),
    ({"model": "tora", "prompt": "x", "stop": ["s"] * 17}, 400, "stop", "at most 16"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
])
def test_bad_completion_requests_get_openai_error_bodies(server: ServeProcess, body: dict[str, Any], status: int,
                                                         param: str, words: str) -> None:
    r = httpx.post(server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == status, r.text
    err = error(r)
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_chat_requests_and_bodies(server: ServeProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = server.url + "/chat/completions"
    r = httpx.post(chat, content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error(r)["message"]
    r = httpx.post(chat, json={"model": "tora", "messages": [{"role": "system", "content": "x"}]}, headers=auth)
    assert r.status_code == 400 and error(r)["param"] == "messages" and "no user message" in error(r)["message"]
    r = httpx.post(chat, json={"model": "tora", "messages": [{"role": "user", "content": "x"}],
                               "tools": [{"type": "function"}]}, headers=auth)
    assert r.status_code == 400 and error(r)["param"] == "tools"
    r = httpx.post(chat, json={"model": "tora", "messages": [{"role": "user", "content": "x" * 70000}]}, headers=auth)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"
    r = httpx.get(chat, headers=auth)
    assert r.status_code == 405 and error(r)["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/nowhere", headers=auth)
    assert r.status_code == 404 and "no such route" in error(r)["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).chat.completions.create(model="tora", messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert bad.value.body["param"] == "logprobs"


def test_a_failed_trajectory_is_a_server_error_and_is_recorded(server: ServeProcess) -> None:
    question = "A question the replay never recorded"
    with pytest.raises(openai.InternalServerError) as failed:
        client(server).completions.create(model="tora", prompt=question)
    assert failed.value.body["code"] == "backend_error" and "no recorded trajectory" in failed.value.body["message"]
    assert record_for(server, question)[-1]["result"]["finish"] == "error"
    with pytest.raises(openai.APIError, match="no recorded trajectory"):
        list(client(server).completions.create(model="tora", prompt=question, stream=True))


# --- disconnects --------------------------------------------------------------------


def raw_request(server: ServeProcess, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request and keep the connection open without reading: a client that will go away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_cancels_its_trajectory_and_frees_its_kernel(server: ServeProcess,
                                                                             stream: bool) -> None:
    before = len(records(server.record))  # type: ignore[attr-defined]
    sock = raw_request(server, "/chat/completions", {"model": "tora", "stream": stream,
                                                     "messages": [{"role": "user", "content": SLEEPY_Q}]})
    wait_for(lambda: health(server)["kernels_live"] == 1)  # its cell is sleeping (60 s)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    freed = wait_for(lambda: health(server)["kernels_live"] == 0 and health(server)["in_flight"] == 0, 30)
    assert freed < 20, "the kernel went back when the client left, not when the cell ended"
    wait_for(lambda: len(records(server.record)) == before + 1, 30)  # type: ignore[attr-defined]
    rec = records(server.record)[-1]  # type: ignore[attr-defined]
    assert rec["problem"]["text"] == SLEEPY_Q and rec["result"]["finish"] == "interrupted"
    assert [s["type"] for s in rec["steps"]] == ["text", "code"]  # cut during its cell


# --- servers of their own -----------------------------------------------------------


def test_requests_beyond_the_limit_queue_then_are_refused(recording: Path, tmp_path: Path) -> None:
    sleepy = write_released(tmp_path / "sleepy.jsonl", [{"idx": i, "question": f"Nap {i}?", "code": [says(i, 4)]}
                                                        for i in range(5)])
    with ServeProcess(["--model", f"replay:{sleepy}", "--concurrency", "2", "--max-queued", "2", "--no-record"]) as s:
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=120)
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            out = c.completions.create(model="tora", prompt=f"Nap {i}?")
            answers[i] = out.choices[0].model_extra["tora"]["trajectory"]["result"]["final_answer"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: (health(s)["in_flight"], health(s)["queued"]) == (2, 2))
        with pytest.raises(openai.RateLimitError) as busy:
            c.completions.create(model="tora", prompt="Nap 4?")
        assert busy.value.body["code"] == "server_busy"
        for t in threads:
            t.join(120)
        assert answers == {i: str(i) for i in range(4)}
        assert health(s)["kernels_peak"] == 2


def test_sigterm_interrupts_running_trajectories_records_them_and_leaves_nothing(recording: Path,
                                                                                tmp_path: Path) -> None:
    record = tmp_path / "serve.jsonl"
    s = ServeProcess(["--model", f"replay:{recording}", "--record-to", str(record), "--timeout", "120"]).start()
    c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=120)
    failures: list[BaseException] = []

    def ask() -> None:
        try:
            c.completions.create(model="tora", prompt=SLEEPY_Q)
        except BaseException as exc:
            failures.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    wait_for(lambda: health(s)["kernels_live"] == 1)
    tree = descendants(s.pid)
    assert tree, "the server runs kernels in child processes"
    t0 = time.monotonic()
    assert s.stop(signal.SIGTERM) == 0, "".join(s.stderr)
    assert time.monotonic() - t0 < 30
    t.join(30)
    assert len(failures) == 1 and isinstance(failures[0], openai.APIStatusError)
    assert failures[0].status_code == 503 and failures[0].body["code"] == "shutting_down"
    assert [r["result"]["finish"] for r in records(record)] == ["interrupted"]
    assert not alive(tree)


def test_serving_beyond_loopback_needs_a_key(recording: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORA_API_KEY"}
    proc = subprocess.run([*TORA, "serve", "--model", f"replay:{recording}", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr and "--api-key" in proc.stderr


def test_tora_api_key_from_the_environment(recording: Path) -> None:
    env = {**os.environ, "TORA_API_KEY": KEY}
    with ServeProcess(["--model", f"replay:{recording}", "--no-record"], env=env) as s:
        assert httpx.get(s.url + "/models").status_code == 401
        assert client(s).models.list().data[0].id == "tora"


@pytest.mark.model
def test_the_embedded_model_served(tmp_path: Path) -> None:
    record = tmp_path / "serve.jsonl"
    with ServeProcess(["--model", "embedded-tiny", "--record-to", str(record), "--max-tokens", "160"]) as s:
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=600)
        question = "What is 12 times 7?"
        out = c.chat.completions.create(model="tora", messages=[{"role": "user", "content": question}])
        trajectory = out.choices[0].model_extra["tora"]["trajectory"]
        assert trajectory["generation"]["backend"] == "llama.cpp" and trajectory["problem"]["text"] == question
        steps = trajectory["steps"]
        completion = "".join(st["content"] if st["type"] == "text" else st.get("observation", "") for st in steps)
        assert out.choices[0].message.content == completion and completion.strip()
        assert trajectory["stats"]["completion_tokens"] <= 160
        assert records(record)[-1]["id"] == trajectory["id"]
