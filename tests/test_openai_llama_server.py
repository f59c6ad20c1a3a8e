"""The openai: backend against a real server: llama-cpp-python's `llama_cpp.server`
serving the tiny embedded model (Gemma 3 270M) on loopback, started through
tora.backends.llama_server (tora's CPU backend choice, its defaults) with an
API key, and stopped at the end of the module.

The model is weak: the tests check structure (the record, the stops the loop
gave, the endpoint used, the key), never accuracy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
from conftest import TORA, collect

from tora import fences
from tora.backends.base import Backend, Delta, Done, GenerationRequest, StreamEvent, checked_stream
from tora.backends.embedded import embedded_model_path
from tora.backends.llama_server import LlamaServer
from tora.backends.llamacpp import LlamaCppBackend
from tora.backends.openai import OpenAIBackend, ServerSpec
from tora.backends.openai.tools import Tools
from tora.engine import Episode, Limits, SolveConfig
from tora.events import Finished
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory, TrajectoryWriter
from tora.record.schema import CodeStep, ExecutionStep, TextStep

pytestmark = [pytest.mark.model, pytest.mark.slow]

SECRET = "sk-tora-test-0123456789abcdef"
GEMMA_TEMPLATE = Path(__file__).parent / "data" / "gemma3-tokenizer"
QUESTION = "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many apples are left?"


@contextlib.contextmanager
def running(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[LlamaServer]:
    """llama_cpp.server with the embedded model, an API key and these flags, stopped at the end."""
    # The same shared model file and engine cache as conftest's per-test homes.
    base = tmp_path_factory.getbasetemp()
    home = tmp_path_factory.mktemp("llama_server_home")
    models = Path(os.environ.get("TORA_TEST_MODELS", base / "models"))
    models.mkdir(parents=True, exist_ok=True)
    (base / "cache").mkdir(exist_ok=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    (home / "cache").symlink_to(base / "cache", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORA_HOME", str(home))
        with LlamaServer(embedded_model_path("embedded-tiny"), args=["--api_key", SECRET, "--verbose", "False", *args],
                         log=home / "server.log") as s:
            yield s
            assert s.proc is not None and s.proc.poll() is None, "the server died during the tests"
        assert s.proc is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with running(tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    # chatml-function-calling: a chat template that offers the tools to the model and parses
    # its calls (grammar-constrained), several per reply; it streams none, hence stream=0.
    with running(tmp_path_factory, "--chat_format", "chatml-function-calling", "--n_ctx", "2048") as s:
        yield s


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("TORA_OPENAI_API_KEY", SECRET)
    return SECRET


def log_lines(server: LlamaServer) -> list[str]:
    assert server.log is not None
    return server.log.read_text(errors="replace").splitlines()


class Recording(Backend):
    """Passes every call through and keeps each request with how it ended."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.model = inner, inner.name, inner.model
        self.calls: list[tuple[GenerationRequest, str, Done]] = []

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.inner.format_chat(messages)

    def for_episode(self, problem: Problem, sample_index: int) -> Recording:
        self.inner = self.inner.for_episode(problem, sample_index)
        return self

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        text = ""
        async for event in checked_stream(self.inner, request):
            if isinstance(event, Delta):
                text += event.text
            else:
                self.calls.append((request, text, event))
                self.model = self.inner.model
            yield event


async def solve(b: Backend, prompt: str, spec: str) -> Trajectory:
    config = SolveConfig(limits=Limits(max_tool_calls=2, max_tokens=240, max_tokens_per_call=120, timeout_s=10))
    episode = Episode(Problem(id="apples", text=QUESTION, answer="31"), backend=b, template=load_prompt(prompt),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=10)), config=config, spec=spec)
    final = [e async for e in episode.run()][-1]
    assert isinstance(final, Finished)
    return final.trajectory


def check_structure(t: Trajectory, calls: list[tuple[GenerationRequest, str, Done]]) -> None:
    assert t.result.finish in ("answered", "no_answer", "max_tool_calls", "max_tokens"), t.result.error
    # llama_cpp.server answers with the model name it was asked for.
    assert (t.generation.backend, t.generation.model) == ("openai", "gemma")
    assert calls, "the model was never called"
    for request, text, done in calls:
        assert request.stop == t.generation.sampling.stop
        if done.finish_reason == "stop":
            assert done.stop_string in request.stop
        for stop in request.stop:
            assert stop not in text, f"the stop string {stop!r} leaked into the model's text"
    # Each call continued exactly the context the loop had built.
    for (request, _, _), (later, _, _) in itertools.pairwise(calls):
        assert later.prompt.startswith(request.prompt)
    last_request, last_text, last_done = calls[-1]
    # The loop writes the closing fence the model stopped at (and, the tool budget spent, runs nothing).
    fence = fences.CLOSE_FENCE if last_done.stop_string == fences.CLOSE_FENCE else ""
    assert t.prompt + "".join(s.context_text() for s in t.steps) == last_request.prompt + last_text + fence
    assert all(step.content for step in t.steps if isinstance(step, TextStep))


async def test_completions_protocol_records_a_real_trajectory(server: LlamaServer, key: str, tmp_path: Path) -> None:
    # body.repeat_penalty=1: llama_cpp.server's own default (1.1) differs from llama.cpp's.
    spec = f"gemma@{server.url}?protocol=completions&body.repeat_penalty=1"
    b = Recording(OpenAIBackend(ServerSpec.parse(spec)))
    t = await solve(b, "tora-gsm8k", f"openai:{spec}")
    await b.inner.aclose()
    check_structure(t, b.calls)
    assert t.prompt == load_prompt("tora-gsm8k").fill(QUESTION)
    stops = [done.stop_string for _, _, done in b.calls if done.finish_reason == "stop"]
    assert stops, "greedy Gemma writes a python block here: generation should have stopped at a loop stop"
    # Same engine, same model, greedy: the server's first answer is the in-process llama.cpp one.
    first_request, first_text, first_done = b.calls[0]
    local = LlamaCppBackend(embedded_model_path("embedded-tiny"))
    text, done = await collect(local, first_request)
    await local.aclose()
    assert (text, done.stop_string) == (first_text, first_done.stop_string)
    # The key reached the server (it requires one) and no record holds it.
    out = tmp_path / "t.jsonl"
    with TrajectoryWriter(out) as writer:
        await writer.append(t)
    assert SECRET not in out.read_text() and t.generation.spec == f"openai:{spec}"


async def solve_chat(server: LlamaServer, spec: str) -> tuple[Trajectory, list[str]]:
    """A chat-prompt trajectory, checked, and the requests the server logged for it."""
    before = len(log_lines(server))
    b = Recording(OpenAIBackend(ServerSpec.parse(spec)))
    t = await solve(b, "chat", f"openai:{spec}")
    await b.inner.aclose()
    check_structure(t, b.calls)
    posts = [line for line in log_lines(server)[before:] if "POST /v1/" in line]
    assert len(posts) == len(b.calls)
    return t, posts


async def test_chat_continue_with_a_local_template_uses_the_completions_endpoint(server: LlamaServer, key: str) -> None:
    t, posts = await solve_chat(server, f"gemma@{server.url}?protocol=chat-continue&template={GEMMA_TEMPLATE}")
    assert t.prompt.startswith("<start_of_turn>user\nIntegrate step-by-step reasoning")
    assert t.prompt.endswith(f"{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    assert all("/v1/completions" in line for line in posts)


async def test_chat_continue_on_the_servers_chat_endpoint(server: LlamaServer, key: str) -> None:
    t, posts = await solve_chat(server, f"gemma@{server.url}?protocol=chat-continue")
    assert t.prompt.startswith("<|system|>\nIntegrate step-by-step")
    assert t.prompt.endswith(f"<|user|>\n{QUESTION}\n<|assistant|>\n")
    assert all("/v1/chat/completions" in line for line in posts)


async def test_closing_the_stream_stops_the_real_server_generating(server: LlamaServer, key: str) -> None:
    b = OpenAIBackend(ServerSpec.parse(f"gemma@{server.url}"))
    before = len(log_lines(server))
    long = GenerationRequest(prompt="Once upon a time", stop=[], max_tokens=4000, temperature=1.0, seed=1)
    seen = 0
    async with contextlib.aclosing(b.stream(long)) as stream:
        async for event in stream:
            seen += isinstance(event, Delta)
            if seen == 5:
                break
    # The server serves one request at a time: this one waits for the long one
    # unless closing aborted it (4000 tokens take well over a minute here).
    t0 = time.monotonic()
    _, done = await collect(b, GenerationRequest(prompt="1, 2, 3,", max_tokens=4))
    waited = time.monotonic() - t0
    await b.aclose()
    assert done is not None and done.finish_reason in ("length", "eos")
    assert waited < 20, f"the next request waited {waited:.1f} s: the first one was not aborted"
    await asyncio.sleep(0.5)
    assert any("disconnected" in line.lower() for line in log_lines(server)[before:])


async def test_concurrent_clients_all_finish(server: LlamaServer, key: str) -> None:
    # llama_cpp.server ends a stream when another request waits, unless told not
    # to (tora's wrapper does): every stream must end with a finish reason.
    b = OpenAIBackend(ServerSpec.parse(f"gemma@{server.url}?concurrency=3"))

    async def one(i: int) -> Done:
        done = None
        async for event in checked_stream(b, GenerationRequest(prompt=f"Count to {i + 3}:", max_tokens=12)):
            if isinstance(event, Done):
                done = event
        assert done is not None
        return done

    dones = await asyncio.gather(*(one(i) for i in range(3)))
    await b.aclose()
    assert all(d.finish_reason in ("length", "eos") for d in dones)


def run_tora(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=600, env=env)


def test_eval_and_solve_through_the_server_never_record_the_key(server: LlamaServer, tmp_path: Path) -> None:
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in
                            enumerate([(QUESTION, "31"), ("What is 15 plus 27?", "42")])))
    spec = f"openai:gemma@{server.url}"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "TORA_OPENAI_API_KEY")}
    out = tmp_path / "run"
    proc = run_tora(["eval", str(data), "--model", spec, "--out", str(out), "--max-tool-calls", "1",
                     "--max-tokens", "200", "--json"], {**env, "TORA_OPENAI_API_KEY": SECRET})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["result"]["finish"] != "error" for r in rows)
    assert {r["generation"]["spec"] for r in rows} == {spec}
    written = [p.read_text() for p in out.rglob("*") if p.is_file()]
    assert len(written) >= 3  # manifest, trajectories, metrics
    for text in [*written, proc.stdout, proc.stderr]:
        assert SECRET not in text

    # Without the key the server refuses, and the user is told where the key goes.
    refused = run_tora(["solve", "--model", spec, "--no-record", QUESTION], env)
    assert refused.returncode == 1
    assert "401" in refused.stderr and "TORA_OPENAI_API_KEY or OPENAI_API_KEY" in refused.stderr
    assert SECRET not in refused.stderr + refused.stdout


async def test_tools_protocol_on_a_server_whose_chat_template_has_tools(tools_server: LlamaServer, key: str) -> None:
    spec = f"gemma@{tools_server.url}?protocol=tools&stream=0"
    before = len(log_lines(tools_server))
    b = Recording(OpenAIBackend(ServerSpec.parse(spec)))
    config = SolveConfig(limits=Limits(max_tool_calls=1, max_tokens=240, max_tokens_per_call=120, timeout_s=10))
    episode = Episode(Problem(id="apples", text=QUESTION, answer="31"), backend=b, template=load_prompt("chat"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=10)), config=config, spec=f"openai:{spec}")
    final = [e async for e in episode.run()][-1]
    await b.inner.aclose()
    assert isinstance(final, Finished)
    t = final.trajectory
    # The server refused nothing: not the tool call sent back (content "", never null: it
    # types content as a string and its template reads it), not the tool message.
    check_structure(t, b.calls)
    assert isinstance(b.inner, OpenAIBackend) and isinstance(b.inner.protocol, Tools)
    replies = b.inner.protocol.replies  # the episode's own protocol: its replies' calls, by the server's ids
    assert t.stats.tool_calls == 1 and replies, "greedy Gemma calls the python tool here"
    executions = [s for s in t.steps if isinstance(s, ExecutionStep)]
    codes = [s.content for s in t.steps if isinstance(s, CodeStep)]
    assert len(executions) == len(codes) == 1
    # Each call ran as a cell; the server was asked once per reply, not once per call.
    posts = [line for line in log_lines(tools_server)[before:] if "POST /v1/chat/completions" in line]
    assert len(posts) == len(b.calls) - sum(len(ids) - 1 for ids in replies.values())
    # The next request answers each call by the id the server gave it.
    fields, _ = b.inner.protocol.fields(GenerationRequest(prompt=t.context()))
    sent = [c["id"] for m in fields["messages"] if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    answered = [m["tool_call_id"] for m in fields["messages"] if m["role"] == "tool"]
    given = [i for ids in replies.values() for i in ids]
    assert sent == answered == given[: len(answered)] and all(i and i.startswith("call_") for i in given)
    assert fields["messages"][3]["content"] == executions[0].rendered


async def test_completions_logprobs_from_the_real_server_are_the_models(server: LlamaServer, key: str) -> None:
    # logprobs=1: llama_cpp.server is not asked by default (it is slow at them).
    b = OpenAIBackend(ServerSpec.parse(f"gemma@{server.url}?logprobs=1&body.repeat_penalty=1"))
    request = GenerationRequest(prompt="The capital of France is", max_tokens=6)
    deltas: list[Delta] = []
    async for event in checked_stream(b, request):
        if isinstance(event, Delta):
            deltas.append(event)
    await b.aclose()
    got = [v for d in deltas for v in d.logprobs or ()]
    assert all(d.logprobs is not None and not d.token_ids for d in deltas)  # logprobs, no ids: none invented
    # The same model in this process, greedy: the logprob of each token it picks.
    from tora.backends.ggml_cpu import ensure_cpu_backend

    ensure_cpu_backend()
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(embedded_model_path("embedded-tiny")), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(llm.tokenize(request.prompt.encode(), add_bos=True))
    want = []
    for _ in range(request.max_tokens):
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logprobs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        token = int(logits.argmax())
        want.append(float(logprobs[token]))
        llm.eval([token])
    llm.close()
    assert len(got) == len(want)
    assert got == pytest.approx(want, abs=2e-2)
