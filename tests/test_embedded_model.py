"""The real embedded models through llama.cpp, end to end: the default (Qwen2.5-Coder 1.5B)
answers the README's problem; the tiny one (Gemma 3 270M) carries the mechanical tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import TORA, collect

from tora.backends.base import Delta, Done, GenerationRequest
from tora.backends.registry import load_backend

pytestmark = pytest.mark.model

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")


def test_the_default_model_answers_the_readme_problem() -> None:
    """The README's first command, as a newcomer runs it: no --model, no --prompt."""
    proc = subprocess.run([*TORA, "solve", "--json", NATALIA], capture_output=True, text=True, timeout=900,
                          env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)
    assert t["generation"]["backend"] == "llama.cpp" and "qwen2.5-coder-1.5b" in t["generation"]["model"]
    assert t["generation"]["prompt_template"]["name"] == "tora-gsm8k"  # the model's own (embedded_models.py)
    assert t["result"]["finish"] == "answered" and t["result"]["final_answer"] == "72"
    assert "execution" in [s["type"] for s in t["steps"]]  # it computed it in the kernel


def test_greedy_solve_executes_code_and_feeds_the_output_back() -> None:
    proc = subprocess.run([*TORA, "solve", "--json", "--model", "embedded-tiny", NATALIA], capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode in (0, 3), proc.stderr
    t = json.loads(proc.stdout)
    assert t["generation"]["backend"] == "llama.cpp" and "gemma" in t["generation"]["model"]
    executed = [s for s in t["steps"] if s["type"] == "execution"]
    assert executed, "the model wrote no code block"
    # The output went back into the context, and the model continued after it.
    context = t["prompt"] + "".join(s["content"] if s["type"] == "text" else s.get("observation", "") for s in t["steps"])
    assert f"```output\n{executed[0]['rendered']}\n```\n" in context
    assert t["steps"][-1]["type"] == "text" and t["stats"]["completion_tokens"] > 0
    assert t["result"]["finish"] in {"answered", "no_answer", "max_tool_calls", "max_tokens"}


def test_stop_strings_cut_generation_and_cancel_is_prompt() -> None:
    backend = load_backend("embedded-tiny")

    async def go() -> tuple[str, Done, float]:
        req = GenerationRequest(prompt="Question: What is 3+4?\nSolution:\n```python\nprint(3 + 4)\n```\n",
                                stop=["```output"], max_tokens=64)
        text, done = await collect(backend, req)
        # Cancelling mid-stream must free the model quickly for the next caller.
        t0 = time.monotonic()
        stream = backend.stream(GenerationRequest(prompt="Count: 1, 2, 3,", max_tokens=500))
        async for _ev in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        async for _ev in backend.stream(GenerationRequest(prompt="Hi", max_tokens=1)):
            pass
        return text, done, time.monotonic() - t0

    async def until_space() -> tuple[str, Done]:
        # Any continuation of a count holds a space within 64 tokens: this stop must fire.
        return await collect(backend, GenerationRequest(prompt="Count: 1, 2, 3,", stop=[" "], max_tokens=64))

    text, done, cancel_s = asyncio.run(go())
    assert "```output" not in text
    assert done.finish_reason in ("stop", "length") and done.prompt_tokens > 10
    if done.finish_reason == "stop":
        assert done.stop_string == "```output"
    assert cancel_s < 3.0
    cut, stopped = asyncio.run(until_space())
    assert stopped is not None and (stopped.finish_reason, stopped.stop_string) == ("stop", " ")
    assert " " not in cut


def test_cached_prefix_state_gives_the_same_greedy_text(tora_home: object) -> None:
    from pathlib import Path

    from tora.prompts import load_prompt

    template = load_prompt("tora-gsm8k")
    prompt = template.fill("What is 12 times 13?")

    async def greedy(backend: object) -> str:
        text = ""
        async for ev in backend.stream(GenerationRequest(prompt=prompt, max_tokens=40)):  # type: ignore[attr-defined]
            if isinstance(ev, Delta):
                text += ev.text
        return text

    # A KV cache of this test's own (the session shares one, where the default model's prefix
    # may already lie), keeping the session's CPU-variant verdict.
    shared = (Path(str(tora_home)) / "cache").resolve()
    (Path(str(tora_home)) / "cache").unlink()
    (Path(str(tora_home)) / "cache" / "kv").mkdir(parents=True)
    if (shared / "ggml-cpu.json").is_file():
        shutil.copy(shared / "ggml-cpu.json", Path(str(tora_home)) / "cache")
    cold = load_backend("embedded-tiny")
    expected = asyncio.run(greedy(cold))
    assert expected.strip()  # equal texts prove nothing if both are empty
    cold.prepare(template.prefix)  # type: ignore[attr-defined]  # computes and saves the state
    saved = list((Path(str(tora_home)) / "cache" / "kv").glob("*.state"))
    assert len(saved) == 1 and saved[0].stat().st_size > 1_000_000
    warm = load_backend("embedded-tiny")
    warm.prepare(template.prefix)  # type: ignore[attr-defined]  # loads it
    assert warm._llm.n_tokens > 100  # type: ignore[attr-defined]
    assert asyncio.run(greedy(warm)) == expected
