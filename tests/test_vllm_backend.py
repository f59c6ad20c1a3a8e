"""The vllm: backend against the real vLLM engine and the real (converted) embedded model.

Needs the second install tier: `./setup.sh --vllm`, then
`.venv-vllm/bin/python -m pytest -q -m vllm`. Without vLLM every test here is
skipped. One engine (enforce_eager: a ~40 s start instead of ~130 s) serves the
module's tests on one event loop; the last of them shuts it down. The first
run in a session also converts the embedded model (about 100 s, shared with
test_models_convert.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
from conftest import TORA, collect, new_tora_home
from token_checks import check_token_invariant

from tora import fences
from tora.backends.base import Delta, Done, GenerationRequest, checked_stream
from tora.backends.convert import convert, embedded_source
from tora.backends.vllm import VllmBackend, VllmOptions
from tora.engine import Episode, Limits, SolveConfig
from tora.errors import BackendError
from tora.events import Finished
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, TrajectoryWriter
from tora.record.schema import ExecutionStep, TextStep
from tora.record.writer import read_trajectories

MISSING = [m for m in ("vllm", "torch", "transformers", "gguf") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: ./setup.sh --vllm, "
                                              "then .venv-vllm/bin/python -m pytest -q -m vllm"),
    pytest.mark.vllm,
    pytest.mark.slow,
]
# The engine's output handler lives on the loop of its first request: the
# tests that share the engine share its loop.
on_the_engine_loop = pytest.mark.asyncio(loop_scope="module")

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")
CODE_PROMPT = "Question: What is 3+4?\nLet's write a program.\n```python\n"
LOOP_STOPS = [fences.OUTPUT_FENCE, fences.CLOSE_FENCE]


@dataclass
class Engine:
    backend: VllmBackend
    processes: list[psutil.Process]  # the engine core and its workers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncGenerator[Engine, None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORA_HOME", str(new_tora_home(tmp_path_factory)))
        path = convert(embedded_source())
        backend = VllmBackend(path, VllmOptions(enforce_eager=True, max_model_len=4096, kv_cache_gb=1.0))
        # Not multiprocessing's resource tracker: one per interpreter, it lives
        # as long as this one (and frees any shared memory vLLM left behind).
        processes = [p for p in psutil.Process().children(recursive=True)
                     if "resource_tracker" not in " ".join(p.cmdline())]
        assert "VLLM::EngineCore" in [p.name() for p in processes]
        yield Engine(backend, processes)
        await backend.aclose()


@on_the_engine_loop
async def test_stop_strings_cut_the_text_exactly_where_the_free_text_has_them(engine: Engine) -> None:
    free, free_done = await collect(engine.backend, GenerationRequest(CODE_PROMPT, max_tokens=48))
    found = [(free.find(s), s) for s in LOOP_STOPS if s in free]
    assert found, f"the model wrote no stop string in 48 tokens: {free!r}"
    cut, stop = min(found)
    text, done = await collect(engine.backend, GenerationRequest(CODE_PROMPT, stop=LOOP_STOPS, max_tokens=48))
    assert text == free[:cut]
    assert done.finish_reason == "stop" and done.stop_string == stop
    assert 0 < done.completion_tokens < free_done.completion_tokens
    assert done.prompt_tokens == free_done.prompt_tokens == len(engine.backend.tokenize(CODE_PROMPT))


@on_the_engine_loop
async def test_max_tokens_is_honoured(engine: Engine) -> None:
    text, done = await collect(engine.backend, GenerationRequest("Count: 1, 2, 3,", max_tokens=5))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    longer, _ = await collect(engine.backend, GenerationRequest("Count: 1, 2, 3,", max_tokens=12))
    assert text and longer.startswith(text) and len(longer) > len(text)


@on_the_engine_loop
async def test_a_prompt_that_fills_the_context_ends_at_once(engine: Engine) -> None:
    prompt = "1, " * 4200  # more tokens than max_model_len=4096
    text, done = await collect(engine.backend, GenerationRequest(prompt, max_tokens=10))
    assert text == "" and done.finish_reason == "length" and done.prompt_tokens > 4096


async def _next_generation_is_prompt(engine: Engine) -> None:
    assert engine.backend._engine.get_num_unfinished_requests() == 0
    t0 = time.monotonic()
    _, done = await collect(engine.backend, GenerationRequest("Hi", max_tokens=2))
    assert done.completion_tokens >= 1
    # Had the abandoned 2000-token request still run, this would wait behind it for minutes.
    assert time.monotonic() - t0 < 30


@on_the_engine_loop
async def test_closing_a_stream_aborts_its_request(engine: Engine) -> None:
    stream = engine.backend.stream(GenerationRequest("Count: 1, 2, 3,", max_tokens=2000))
    first = await anext(stream)
    assert isinstance(first, Delta)
    assert engine.backend._engine.get_num_unfinished_requests() == 1
    await stream.aclose()  # type: ignore[attr-defined]
    await _next_generation_is_prompt(engine)


@on_the_engine_loop
async def test_cancelling_a_consumer_aborts_its_request(engine: Engine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _event in engine.backend.stream(GenerationRequest("Count: 1, 2, 3,", max_tokens=2000)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _next_generation_is_prompt(engine)


@on_the_engine_loop
async def test_four_requests_in_flight_are_batched(engine: Engine) -> None:
    n = 32

    async def timed(k: int) -> tuple[float, float, Done]:
        t0 = time.monotonic()
        first = None
        done = None
        async for event in checked_stream(engine.backend, GenerationRequest(f"Count from {k}: {k}, {k + 1},", max_tokens=n)):
            if isinstance(event, Delta) and first is None:
                first = time.monotonic() - t0
            elif isinstance(event, Done):
                done = event
        assert first is not None and done is not None
        return first, time.monotonic() - t0, done

    # One request alone, before and after (the machine may be shared: average them).
    before = (await timed(10))[1]
    t0 = time.monotonic()
    results = await asyncio.gather(*(timed(k) for k in (20, 30, 40, 50)))
    four = time.monotonic() - t0
    singles = [before, (await timed(60))[1]]
    one = sum(singles) / 2
    assert all(d.finish_reason == "length" and d.completion_tokens == n for _, _, d in results)
    # All four were generating at once: each had its first text before any finished.
    assert max(first for first, _, _ in results) < min(end for _, end, _ in results)
    # One after another would take four times as long.
    assert four < 3 * one, (singles, four)


@on_the_engine_loop
async def test_an_episode_records_a_trajectory_with_the_real_model(engine: Engine, tmp_path: Path) -> None:
    episode = Episode(
        Problem(id="natalia", text=NATALIA, answer="72"),
        backend=engine.backend,
        template=load_prompt("tora-gsm8k"),
        kernels=FreshKernels(SandboxPolicy(timeout_s=10)),
        config=SolveConfig(limits=Limits(max_tokens=600, max_tokens_per_call=300)),
        spec="vllm:embedded",
    )
    events = [e async for e in episode.run()]
    final = events[-1]
    assert isinstance(final, Finished)
    t = final.trajectory
    assert t.result.finish != "error", t.result.error
    assert t.generation.backend == "vllm" and t.generation.spec == "vllm:embedded"
    assert t.stats.completion_tokens > 0 and t.stats.prompt_tokens > 0
    executed = [s for s in t.steps if isinstance(s, ExecutionStep)]
    assert executed, "the model wrote no code block"
    # The output went back into the context and the model went on after it.
    context = t.prompt + "".join(s.content if isinstance(s, TextStep) else getattr(s, "observation", "") for s in t.steps)
    assert f"```output\n{executed[0].rendered}\n```\n" in context
    assert isinstance(t.steps[-1], TextStep)
    with TrajectoryWriter(tmp_path / "t.jsonl") as writer:
        writer.append_sync(t)
    (back,) = read_trajectories(tmp_path / "t.jsonl")
    assert back.content_hash == t.content_hash == t.compute_content_hash()
    # The token path: the record's ids are exactly vLLM's prompt_token_ids of the last
    # request and what it sampled, around a real output block, and decode to the text.
    check_token_invariant(t, engine.backend)
    assert t.generation.model_id is not None and t.generation.model_id.kind == "safetensors"
    assert [s.type for s in t.steps].index("execution") < len(t.steps) - 1


@on_the_engine_loop
async def test_a_stop_string_inside_a_token_keeps_the_whole_token(engine: Engine) -> None:
    backend = engine.backend

    async def run(stop: list[str]) -> tuple[str, list[int], Done]:
        ids: list[int] = []
        text, done = "", None
        async for event in checked_stream(backend, GenerationRequest(CODE_PROMPT, stop=stop, max_tokens=32)):
            if isinstance(event, Delta):
                text += event.text
                ids += event.token_ids
                assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids)
            else:
                done = event
        assert done is not None
        return text, ids, done

    # A stop string that is the first character of a longer token the model writes anyway.
    free, ids, _ = await run([])
    pieces = [backend.detokenize(ids[: k + 1])[len(backend.detokenize(ids[:k])) :] for k in range(len(ids))]
    assert "".join(pieces) == free
    at = next(k for k, p in enumerate(pieces) if len(p) >= 2 and p[0] not in "".join(pieces[:k]))
    stop = pieces[at][0]
    text, cut_ids, done = await run([stop])
    assert (done.stop, done.stop_string) == ("stop_string", stop)
    assert cut_ids == ids[: at + 1] and text == "".join(pieces[:at]) and done.tail == pieces[at]
    assert backend.detokenize(cut_ids) == text + done.tail


@on_the_engine_loop
async def test_another_event_loop_is_told_to_load_its_own_backend(engine: Engine) -> None:
    with pytest.raises(BackendError, match="event loop it first ran in"):
        await asyncio.to_thread(asyncio.run, collect(engine.backend, GenerationRequest("Hi", max_tokens=2)))


@on_the_engine_loop
async def test_close_shuts_the_engine_down_and_leaves_no_process(engine: Engine) -> None:
    """Runs last in this module: it closes the shared engine."""
    assert all(p.is_running() for p in engine.processes)
    t0 = time.monotonic()
    await engine.backend.aclose()
    _, alive = psutil.wait_procs(engine.processes, timeout=20)
    assert not alive, [p.pid for p in alive]
    assert time.monotonic() - t0 < 30
    with pytest.raises(BackendError, match="shut down"):
        await collect(engine.backend, GenerationRequest("Hi", max_tokens=2))


def test_solve_through_the_cli_keeps_stdout_json_and_writes_nothing_outside_tora_home(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A spawned engine core, `--json` on stdout despite vLLM's logging, and no file in $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    tora_home = new_tora_home(tmp_path_factory)
    env: dict[str, Any] = {k: v for k, v in os.environ.items()
                           if not k.startswith(("XDG_", "VLLM_", "HF_", "TRANSFORMERS_", "TORCH"))}
    env.update(HOME=str(home), TORA_HOME=str(tora_home))
    proc = subprocess.run(
        [*TORA, "solve", "--json", "--model", "vllm:embedded?enforce_eager=1&max_model_len=4096&kv_cache_gb=1",
         "--max-tokens", "300", NATALIA],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()
    t = json.loads(line)
    assert t["generation"]["backend"] == "vllm" and t["stats"]["completion_tokens"] > 0
    written = [str(p.relative_to(home)) for p in home.rglob("*")]
    assert written == [], f"vLLM wrote into $HOME: {written}"
    assert (tora_home / "cache" / "vllm").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"], "something was written into the working dir"
