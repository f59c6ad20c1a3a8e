"""The openai: backend against scripted OpenAI-compatible servers on loopback.

The server (tests/openai_double.py) is a test double for the HTTP protocol
only: it stands in where no small real server can (native tool calls, 429 and
5xx answers, a server that reports stop_reason, a stream left mid-way). The
real-model checks are in test_openai_llama_server.py. The loop, the kernel
and the record are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
from conftest import collect
from openai_double import ScriptedServer, Status, Stream, Whole, chat_chunks, chat_reply, completion_chunks

from tora import fences
from tora.backends.base import Delta, Done, GenerationRequest, checked_stream
from tora.backends.llama_server import server_argv
from tora.backends.openai import OpenAIBackend, ServerSpec
from tora.engine import Episode, Limits, RenderSettings, SolveConfig
from tora.errors import BackendError
from tora.events import Finished
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory
from tora.record.schema import CodeStep, ExecutionStep, TextStep

STOPS = [fences.OUTPUT_FENCE, fences.CLOSE_FENCE, "\n---"]


def backend(server: ScriptedServer, options: str = "", model: str = "scripted") -> OpenAIBackend:
    return OpenAIBackend(ServerSpec.parse(f"{model}@{server.url}?backoff=0.01{options}"))


async def generate(b: OpenAIBackend, prompt: str = "Q: 6*7?\n", stop: list[str] = STOPS,
                   max_tokens: int = 64) -> tuple[str, Done]:
    return await collect(b, GenerationRequest(prompt=prompt, stop=stop, max_tokens=max_tokens))


async def solve(b: OpenAIBackend, prompt: str = "chat", run_on: str = "close",
                text: str = "What is 6 times 7?") -> Trajectory:
    config = SolveConfig(limits=Limits(max_tool_calls=3, max_tokens=512, max_tokens_per_call=128, timeout_s=10),
                         render=RenderSettings(run_on=run_on))  # type: ignore[arg-type]
    episode = Episode(Problem(id="p1", text=text), backend=b, template=load_prompt(prompt),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=10)), config=config, spec=f"openai:{b.spec.model}")
    final = [e async for e in episode.run()][-1]
    assert isinstance(final, Finished)
    return final.trajectory


async def solved(reply: Any, options: str) -> tuple[Trajectory, ScriptedServer]:
    """A trajectory solved against a scripted server with these spec options, and the server."""
    with ScriptedServer(reply) as server:
        b = backend(server, options)
        t = await solve(b)
        await b.aclose()
    return t, server


def context(t: Trajectory) -> str:
    return t.prompt + "".join(s.context_text() for s in t.steps)


async def test_completions_cut_at_the_loops_stop_and_the_server_is_asked_nothing_it_cannot_report() -> None:
    # A server like llama-cpp-python's: finish_reason only, no stop_reason. The
    # client cuts the stream at the stop string itself and sends no stops.
    reply = Stream(completion_chunks(["```python\nprint(6", " * 7)\n``", "`\nafter the fence"]))
    with ScriptedServer(lambda path, body, n: reply) as server:
        b = backend(server)
        text, done = await generate(b)
        again = await generate(b)
        await b.aclose()
    assert text == "```python\nprint(6 * 7)"
    assert (done.finish_reason, done.stop_string) == ("stop", fences.CLOSE_FENCE)
    assert again == (text, done)
    bodies = server.bodies("/completions")
    assert [("stop" in body) for body in bodies] == [False, False]
    assert bodies[0]["prompt"] == "Q: 6*7?\n" and bodies[0]["model"] == "scripted" and bodies[0]["stream"] is True


async def test_a_server_that_reports_stop_reason_gets_the_stops_and_its_report_is_used() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        if n == 0:  # the model ends its text: the server says it was no stop string
            return Stream(completion_chunks(["Done."], "stop", stop_reason=None))
        # The server cut at "\n---" and streamed none of it: only its report says which stop fired.
        return Stream(completion_chunks(["So it is 42.\n"], "stop", stop_reason="\n---"))

    with ScriptedServer(reply) as server:
        b = backend(server)
        first = await generate(b)
        second = await generate(b)
        await b.aclose()
    assert first == ("Done.", Done("eos", None, 0, 1))
    assert second[0] == "So it is 42.\n"
    assert (second[1].finish_reason, second[1].stop_string) == ("stop", "\n---")
    bodies = server.bodies()
    assert "stop" not in bodies[0] and bodies[1]["stop"] == STOPS


async def test_usage_from_the_server_is_the_token_count() -> None:
    chunks = completion_chunks(["a", "b"], "length")
    chunks.append({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "scripted", "choices": [],
                   "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}})
    with ScriptedServer(lambda path, body, n: Stream(chunks)) as server:
        b = backend(server)
        text, done = await generate(b)
        await b.aclose()
    assert text == "ab" and done == Done("length", None, 11, 2)
    assert server.bodies()[0]["stream_options"] == {"include_usage": True}


async def test_tools_protocol_records_a_trajectory_like_any_other() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        assert path == "/v1/chat/completions"
        if n == 0:
            return Stream(chat_chunks(["Let me ", "compute it."], "tool_calls", tool_code="x = 6\nprint(x * 7)\n"))
        return Stream(chat_chunks(["The product is ", "$\\boxed{42}$."], "stop"))

    t, server = await solved(reply, "&protocol=tools")
    assert t.result.finish == "answered" and t.result.final_answer == "42"
    kinds = [type(s) for s in t.steps]
    assert kinds == [TextStep, CodeStep, ExecutionStep, TextStep]
    text, code, execution, _ = t.steps
    assert isinstance(text, TextStep) and isinstance(code, CodeStep) and isinstance(execution, ExecutionStep)
    assert text.content == "Let me compute it.\n```python\nx = 6\nprint(x * 7)\n```\n"
    assert code.content == "x = 6\nprint(x * 7)\n"
    assert execution.stdout == "42\n" and execution.observation == "```output\n42\n```\n"
    assert t.prompt.startswith("<|system|>\n") and t.prompt.endswith("<|user|>\nWhat is 6 times 7?\n<|assistant|>\n")
    assert context(t).endswith("```output\n42\n```\nThe product is $\\boxed{42}$.")

    first, second = server.bodies()
    assert first["tools"][0]["function"]["name"] == "python"
    assert first["tools"][0]["function"]["parameters"]["required"] == ["code"]
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert "stop" not in first  # a stop string inside a tool call's code would cut the call
    system, user, call, result = second["messages"]
    assert (system["role"], user) == ("system", {"role": "user", "content": "What is 6 times 7?"})
    assert call["role"] == "assistant" and call["content"] == "Let me compute it."
    assert call["tool_calls"][0]["function"]["name"] == "python"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"code": "x = 6\nprint(x * 7)"}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "42"}
    assert "continue_final_message" not in second


async def test_tools_under_toras_protocol_end_at_the_output_fence() -> None:
    with ScriptedServer(lambda path, body, n: Stream(chat_chunks([], "tool_calls", tool_code="print(1)"))) as server:
        b = backend(server, "&protocol=tools")
        prompt = "<|user|>\nQ\n<|assistant|>\nThinking"
        text, done = await generate(b, prompt, stop=[fences.OUTPUT_FENCE])
        await b.aclose()
    assert text == "\n```python\nprint(1)\n```\n"
    assert (done.finish_reason, done.stop_string) == ("stop", fences.OUTPUT_FENCE)
    # The turn in progress goes back as an assistant message to continue.
    body = server.bodies()[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "Thinking"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


async def test_chat_continue_sends_the_solution_so_far_as_the_assistant_message() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        if n == 0:
            return Stream(chat_chunks(["Compute:\n```python\npri", "nt(6 * 7)\n```\nand more"]))
        return Stream(chat_chunks(["So it is $\\boxed{42}$."]))

    t, server = await solved(reply, "&protocol=chat-continue")
    assert t.result.finish == "answered" and t.result.final_answer == "42"
    first, second = server.bodies("/chat/completions")
    assert [m["role"] for m in first["messages"]] == ["system", "user"] and "continue_final_message" not in first
    assert second["messages"][-1] == {"role": "assistant",
                                      "content": "Compute:\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n"}
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    assert context(t).endswith("```output\n42\n```\nSo it is $\\boxed{42}$.")


async def test_a_chat_protocol_with_a_completion_prompt_fails_the_trajectory_clearly() -> None:
    with ScriptedServer(lambda path, body, n: Stream(chat_chunks(["x"]))) as server:
        b = backend(server, "&protocol=chat-continue")
        t = await solve(b, prompt="tora-gsm8k")
        await b.aclose()
    assert t.result.finish == "error" and t.result.error is not None
    assert "--prompt chat" in t.result.error.message and not server.requests


async def test_429_and_503_are_retried_then_the_stream_goes_on() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Status | Stream:
        if n == 0:
            return Status(429, "slow down", {"retry-after": "0"})
        if n == 1:
            return Status(503, "warming up")
        return Stream(completion_chunks(["fine"], "stop"))

    with ScriptedServer(reply) as server:
        b = backend(server)
        text, done = await generate(b)
        await b.aclose()
    assert (text, done.finish_reason) == ("fine", "eos")
    assert len(server.requests) == 3


async def test_a_server_that_always_fails_gives_a_bounded_backend_error() -> None:
    with ScriptedServer(lambda path, body, n: Status(500, "engine crashed")) as server:
        b = backend(server, "&retries=3")
        t0 = time.monotonic()
        with pytest.raises(BackendError) as info:
            await generate(b)
        elapsed = time.monotonic() - t0
        await b.aclose()
    message = str(info.value)
    assert server.url in message and "500" in message and "4 times" in message and "engine crashed" in message
    assert len(server.requests) == 4
    assert elapsed < 5  # 0.01 + 0.02 + 0.04 s of backoff, jittered


async def test_an_unreachable_server_is_named_after_bounded_retries() -> None:
    from tora.backends.llama_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    b = OpenAIBackend(ServerSpec.parse(f"m@{url}?retries=2&backoff=0.01"))
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach the server at") as info:
        await generate(b)
    assert url in str(info.value) and "3 tries" in str(info.value)
    assert time.monotonic() - t0 < 5
    await b.aclose()


async def test_client_errors_are_not_retried_and_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORA_OPENAI_API_KEY", "sk-test-very-secret")

    def reply(path: str, body: dict[str, Any], n: int) -> Status:
        if body["model"] == "locked":
            return Status(401, "Invalid API key")
        if body["model"] == "missing":
            return Status(404, "The model `missing` does not exist.")
        return Status(400, "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens.")

    with ScriptedServer(reply, models=("gemma", "qwen")) as server:
        errors = {}
        for model in ("locked", "missing", "long"):
            b = backend(server, model=model)
            with pytest.raises(BackendError) as info:
                await generate(b)
            errors[model] = str(info.value)
            await b.aclose()
        sent = server.requests
    assert len(sent) == 3  # one try each
    assert "401" in errors["locked"] and "TORA_OPENAI_API_KEY or OPENAI_API_KEY" in errors["locked"]
    assert "no model 'missing'" in errors["missing"] and "it serves gemma, qwen" in errors["missing"]
    assert "does not fit the model's context" in errors["long"] and "--max-tokens-per-call" in errors["long"]
    assert all("sk-test-very-secret" not in e for e in errors.values())
    assert sent[0].headers["authorization"] == "Bearer sk-test-very-secret"


async def test_the_model_is_asked_of_the_server_when_the_spec_leaves_it_out() -> None:
    with ScriptedServer(lambda path, body, n: Stream(completion_chunks(["hi"])), models=("only-one",)) as server:
        b = OpenAIBackend(ServerSpec.parse(server.url))
        await generate(b)
        await b.aclose()
    assert b.model == "only-one" and server.bodies()[0]["model"] == "only-one"
    with ScriptedServer(lambda path, body, n: Stream(completion_chunks(["hi"])), models=("a", "b")) as server:
        b = OpenAIBackend(ServerSpec.parse(server.url))
        with pytest.raises(BackendError, match="serves 2 models"):
            await generate(b)
        await b.aclose()


def test_llama_server_defaults_suit_tora_and_yield_to_given_flags() -> None:
    argv = server_argv(["--model", "m.gguf", "--n_ctx=2048"])
    assert argv[:3] == ["--model", "m.gguf", "--n_ctx=2048"]
    assert argv[3:] == ["--host", "127.0.0.1", "--interrupt_requests", "False"]


async def test_a_stream_cut_without_a_finish_reason_is_an_error() -> None:
    chunks = completion_chunks(["partial "], None)
    with ScriptedServer(lambda path, body, n: Stream(chunks, done=True)) as server:
        b = backend(server)
        with pytest.raises(BackendError, match="without a finish reason"):
            await generate(b)
        await b.aclose()


async def test_an_error_in_the_middle_of_a_stream_names_the_server() -> None:
    chunks = [*completion_chunks(["par", "tial"], None)[:2], {"error": {"message": "CUDA out of memory"}}]
    with ScriptedServer(lambda path, body, n: Stream(chunks)) as server:
        b = backend(server)
        with pytest.raises(BackendError, match="failed in the middle of an answer: CUDA out of memory") as info:
            await generate(b)
        await b.aclose()
    assert server.url in str(info.value)


async def test_closing_the_stream_aborts_the_request_on_the_server() -> None:
    slow = Stream(completion_chunks([f"word{i} " for i in range(400)]), delay=0.05)  # 20 s if read to the end
    with ScriptedServer(lambda path, body, n: slow) as server:
        b = backend(server)
        stream = b.stream(GenerationRequest(prompt="Q", stop=STOPS, max_tokens=1000))
        got = []
        async with contextlib.aclosing(stream):
            async for event in stream:
                got.append(event)
                if len(got) == 3:
                    break
        t0 = time.monotonic()
        seen = await asyncio.to_thread(server.disconnected.wait, 5)
        waited = time.monotonic() - t0
        await b.aclose()
    assert seen and waited < 2
    assert server.completed == 0


async def test_concurrent_requests_are_held_to_the_limit() -> None:
    with ScriptedServer(lambda path, body, n: Stream(completion_chunks(["a", "b", "c"]), delay=0.1)) as server:
        b = backend(server, "&concurrency=2")
        results = await asyncio.gather(*(generate(b) for _ in range(6)))
        await b.aclose()
    assert all(text == "abc" for text, _ in results)
    assert server.max_in_flight == 2


def calls_of(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, tool call id or answered id) of each message after the user's."""
    out = []
    for m in body["messages"][2:]:
        if m["role"] == "assistant":
            out += [("call", c["id"]) for c in m.get("tool_calls") or []]
        elif m["role"] == "tool":
            out.append(("tool", m["tool_call_id"]))
    return out


async def test_tools_run_every_call_of_a_reply_in_one_kernel_and_answer_each_by_its_id() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        if n == 0:  # one reply, three calls: the later ones use what the first defined
            return Stream(chat_chunks(["Step by step."], "tool_calls",
                                      tool_code=["x = 6", "print(x * 7)", "print(x + 1)"]))
        return Stream(chat_chunks(["So $\\boxed{42}$."]))

    t, server = await solved(reply, "&protocol=tools")
    assert t.result.finish == "answered" and t.result.final_answer == "42"
    executions = [s for s in t.steps if isinstance(s, ExecutionStep)]
    assert [s.stdout for s in executions] == ["", "42\n", "7\n"]  # in order, in one kernel
    assert [s.content for s in t.steps if isinstance(s, CodeStep)] == ["x = 6\n", "print(x * 7)\n", "print(x + 1)\n"]
    assert t.stats.tool_calls == 3
    # Calls two and three were the first reply's: the server was asked twice in all.
    _, second = server.bodies()
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "tool", "tool"]
    message = second["messages"][2]
    assert message["content"] == "Step by step."
    assert [json.loads(c["function"]["arguments"])["code"] for c in message["tool_calls"]] == [
        "x = 6", "print(x * 7)", "print(x + 1)"]
    assert calls_of(second) == [("call", "call_x0"), ("call", "call_x1"), ("call", "call_x2"),
                                ("tool", "call_x0"), ("tool", "call_x1"), ("tool", "call_x2")]
    assert [m["content"] for m in second["messages"][3:]] == ["", "42", "7"]
    assert context(t).endswith("```output\n7\n```\nSo $\\boxed{42}$.")


async def test_a_reply_whose_calls_outrun_the_tool_budget_stops_at_the_budget() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        return Stream(chat_chunks([], "tool_calls", tool_code=[f"print({i})" for i in range(5)]))

    t, server = await solved(reply, "&protocol=tools")  # max_tool_calls=3
    assert t.result.finish == "max_tool_calls" and t.stats.tool_calls == 3
    assert [s.stdout for s in t.steps if isinstance(s, ExecutionStep)] == ["0\n", "1\n", "2\n"]
    assert len(server.requests) == 1


async def test_each_episode_keeps_its_own_calls() -> None:
    # Two trajectories at once on one backend: each runs its own reply's calls.
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        question = body["messages"][1]["content"]
        if len(body["messages"]) == 2:
            k = 6 if "6" in question else 5
            return Stream(chat_chunks([], "tool_calls", tool_code=[f"x = {k}", "print(x * 7)"]), delay=0.02)
        return Stream(chat_chunks(["$\\boxed{" + body["messages"][-1]["content"] + "}$"]))

    with ScriptedServer(reply) as server:
        b = backend(server, "&protocol=tools")
        six, five = await asyncio.gather(solve(b, text="What is 6 times 7?"), solve(b, text="What is 5 times 7?"))
        await b.aclose()
    assert (six.result.final_answer, five.result.final_answer) == ("42", "35")
    assert len(server.requests) == 4


async def test_whole_replies_with_stream_0_for_servers_that_stream_no_tool_calls() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Whole:
        if n == 0:
            return Whole(chat_reply(None, ["y = 2", "print(y ** 5)"], "tool_calls",
                                    ids=["call__0_python_cmpl-1", "call__1_python_cmpl-1"]))
        return Whole(chat_reply("It is $\\boxed{32}$."))

    t, server = await solved(reply, "&protocol=tools&stream=0")
    assert t.result.final_answer == "32"
    assert [s.stdout for s in t.steps if isinstance(s, ExecutionStep)] == ["", "32\n"]
    first, second = server.bodies()
    assert first["stream"] is False and "stream_options" not in first and first["tool_choice"] == "auto"
    assert calls_of(second) == [("call", "call__0_python_cmpl-1"), ("call", "call__1_python_cmpl-1"),
                                ("tool", "call__0_python_cmpl-1"), ("tool", "call__1_python_cmpl-1")]
    text = [s for s in t.steps if isinstance(s, TextStep)]
    # The reply's usage counts its tokens once, on its first call.
    assert [s.completion_tokens for s in text] == [9, 0, 9]


async def test_a_reply_cut_inside_its_last_call_runs_the_complete_ones() -> None:
    chunks = chat_chunks([], "length", tool_code=["print(1)", "print(2)"])
    chunks[-2]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] = ""  # the second call is cut
    t, _ = await solved(lambda path, body, n: Stream(chunks), "&protocol=tools")
    assert [s.stdout for s in t.steps if isinstance(s, ExecutionStep)] == ["1\n"]
    assert t.result.finish == "max_tokens"
    assert context(t).endswith('```output\n1\n```\n```python\n{"code": "')  # the half that came


def vllm_chunks(pieces: list[tuple[str, list[int], list[float]]], finish: str | None = "stop",
                chat: bool = False) -> list[dict[str, Any]]:
    """Chunks as vLLM streams them with return_token_ids and logprobs (alternatives named by id);
    a piece without ids is one token named by its text, as llama-cpp-python streams them."""
    chunks = []
    for text, ids, logprobs in pieces:
        names = [f"token_id:{i}" for i in ids] or [text]
        if chat:
            lp: dict[str, Any] = {"content": [{"token": name, "logprob": v, "bytes": None,
                                              "top_logprobs": [{"token": name, "logprob": v, "bytes": None}]}
                                             for name, v in zip(names, logprobs, strict=True)]}
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": lp}
        else:
            lp = {"tokens": names, "token_logprobs": logprobs,
                  "top_logprobs": [{name: v} for name, v in zip(names, logprobs, strict=True)],
                  "text_offset": [0] * len(names)}
            choice = {"index": 0, "text": text, "logprobs": lp}
        chunks.append({"id": "c", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                       "model": "scripted", "choices": [{**choice, "finish_reason": None, "token_ids": ids}]})
    end: dict[str, Any] = {"index": 0, "finish_reason": finish, "stop_reason": None, "token_ids": []}
    end |= {"delta": {}} if chat else {"text": ""}
    chunks.append({"id": "c", "object": "x", "created": 0, "model": "scripted", "choices": [end]})
    return chunks


async def events_of(b: OpenAIBackend, request: GenerationRequest) -> tuple[list[Delta], Done]:
    deltas, done = [], None
    async for event in checked_stream(b, request):
        if isinstance(event, Delta):
            deltas.append(event)
        else:
            done = event
    assert done is not None
    return deltas, done


async def test_a_vllm_server_is_asked_for_token_ids_and_they_come_with_logprobs_and_the_tail() -> None:
    pieces = [("Let", [10], [-0.5]), (" me\n``", [11, 12], [-0.25, -1.0]), ("`output\nx", [13], [-2.0]),
              ("never read", [14], [-0.1])]
    with ScriptedServer(lambda path, body, n: Stream(vllm_chunks(pieces)), owned_by="vllm") as server:
        b = backend(server)
        request = GenerationRequest(prompt="Q", stop=STOPS, max_tokens=50, top_logprobs=1)
        deltas, done = await events_of(b, request)
        deltas2, _ = await events_of(b, request)  # the stop reports seen: still no stops sent with ids
        await b.aclose()
    body, again = server.bodies()
    assert body["return_token_ids"] is True and body["return_tokens_as_token_ids"] is True
    assert body["logprobs"] == 1 and "stop" not in again
    assert "".join(d.text for d in deltas) == "Let me\n"
    assert [i for d in deltas for i in d.token_ids] == [10, 11, 12, 13]
    assert [v for d in deltas for v in d.logprobs or ()] == [-0.5, -0.25, -1.0, -2.0]
    assert [t for d in deltas for t in d.top_logprobs or ()] == [{10: -0.5}, {11: -0.25}, {12: -1.0}, {13: -2.0}]
    # The ids hold the stop and what its token held past it: that is the tail.
    assert (done.finish_reason, done.stop_string, done.tail) == ("stop", fences.OUTPUT_FENCE, "```output\nx")
    assert done.completion_tokens == 4
    assert deltas2 == deltas


async def test_token_ids_are_not_asked_of_other_servers_and_logprobs_only_at_raw_temperatures() -> None:
    pieces = [("4", [], [-0.1]), ("2", [], [-0.2])]
    with ScriptedServer(lambda path, body, n: Stream(vllm_chunks(pieces))) as server:  # not vLLM
        b = backend(server)
        greedy, done = await events_of(b, GenerationRequest(prompt="Q", max_tokens=5, temperature=0.0))
        hot, _ = await events_of(b, GenerationRequest(prompt="Q", max_tokens=5, temperature=0.7))
        off = backend(server, "&logprobs=0")
        await events_of(off, GenerationRequest(prompt="Q", max_tokens=5))
        await b.aclose()
        await off.aclose()
    with ScriptedServer(lambda path, body, n: Stream(vllm_chunks(pieces)), owned_by="me") as slow:
        for options in ("", "&logprobs=1"):  # llama-cpp-python's: only when the spec asks
            c = backend(slow, options)
            await events_of(c, GenerationRequest(prompt="Q", max_tokens=5))
            await c.aclose()
    first, _, third = server.bodies()
    assert "return_token_ids" not in first and first["logprobs"] == 0 and "logprobs" not in third
    assert ["logprobs" in body for body in slow.bodies()] == [False, True]
    assert [(d.text, d.token_ids, d.logprobs, d.top_logprobs) for d in greedy] == [("4", (), (-0.1,), None),
                                                                                   ("2", (), (-0.2,), None)]
    assert done.tail == ""  # no ids: nothing past the text is known
    # At 0.7 the raw-logit logprobs the server reports are not those sampled from.
    assert [(d.text, d.logprobs) for d in hot] == [("4", None), ("2", None)]


async def test_chat_continue_carries_vllm_token_ids_and_logprobs() -> None:
    pieces = [("6*7", [5, 6], [-0.3, -0.4]), (" = 42", [7], [-0.01])]
    with ScriptedServer(lambda path, body, n: Stream(vllm_chunks(pieces, chat=True)), owned_by="vllm") as server:
        b = backend(server, "&protocol=chat-continue")
        deltas, done = await events_of(b, GenerationRequest(prompt="<|user|>\nQ\n<|assistant|>\n", max_tokens=9))
        await b.aclose()
    body = server.bodies()[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 0 and body["return_token_ids"] is True
    assert [(d.text, d.token_ids, d.logprobs, d.top_logprobs) for d in deltas] == [
        ("6*7", (5, 6), (-0.3, -0.4), None), (" = 42", (7,), (-0.01,), None)]
    assert done.finish_reason == "eos"


async def test_the_tools_protocol_asks_for_no_tokens() -> None:
    with ScriptedServer(lambda path, body, n: Stream(chat_chunks(["hi"])), owned_by="vllm") as server:
        b = backend(server, "&protocol=tools")
        await events_of(b, GenerationRequest(prompt="<|user|>\nQ\n<|assistant|>\n", max_tokens=9))
        await b.aclose()
    body = server.bodies()[0]
    assert not {"logprobs", "top_logprobs", "return_token_ids"} & set(body)


async def test_a_trajectory_on_a_vllm_server_records_its_ids_and_logprobs_on_the_text_path() -> None:
    def reply(path: str, body: dict[str, Any], n: int) -> Stream:
        if n == 0:  # the stop "\n```\n" ends inside the third token: its whole text is kept
            return Stream(vllm_chunks([("```python\n", [1], [-0.1]), ("print(6*7)", [2], [-0.2]),
                                       ("\n```\n\n", [3], [-0.3]), ("never read", [4], [-0.4])]))
        # The end of text: an id (EOS) with no text.
        return Stream(vllm_chunks([("So $\\boxed{42}$.", [5, 6], [-0.01, -0.02]), ("", [7], [-0.5])]))

    with ScriptedServer(reply, owned_by="vllm") as server:
        b = backend(server)
        t = await solve(b, prompt="tora-gsm8k")
        await b.aclose()
    assert t.result.final_answer == "42" and t.generation.token_path == "text" and t.prompt_ids is None
    first, _, execution, last = t.steps
    assert isinstance(first, TextStep) and isinstance(execution, ExecutionStep) and isinstance(last, TextStep)
    assert (first.content, first.token_ids, first.logprobs) == ("```python\nprint(6*7)\n```\n\n", [1, 2, 3],
                                                                [-0.1, -0.2, -0.3])
    assert first.stop is not None and (first.stop.kind, first.stop.string) == ("stop_string", fences.CLOSE_FENCE)
    assert execution.stdout == "42\n"
    assert (last.content, last.token_ids, last.logprobs) == ("So $\\boxed{42}$.", [5, 6, 7], [-0.01, -0.02, -0.5])
    assert last.stop is not None and last.stop.kind == "eos"
    assert all("stop" not in body for body in server.bodies())  # cut here, so every id's text was seen
