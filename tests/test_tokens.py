"""Token-level records (schema 1.2) from the real embedded model through llama.cpp,
with a real sandboxed kernel writing the output blocks in the middle.

The invariant under test: prompt_ids + the steps' ids are exactly the sequence
llama.cpp evaluated (its own `input_ids[:n_tokens]`; it never evaluates the
token it ended on), and each text step's ids decode to its recorded text.
The transformers backend's invariant is in test_transformers_backend.py, vLLM's
in test_vllm_backend.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from conftest import write_released
from token_checks import check_token_invariant

from tora import fences
from tora.backends.base import Delta, Done, GenerationRequest, checked_stream
from tora.backends.llamacpp import LlamaCppBackend
from tora.backends.registry import load_backend
from tora.backends.replay import ReplayBackend
from tora.engine import Episode, Limits, SolveConfig
from tora.events import Finished
from tora.export.rl import rl_row
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory
from tora.record.schema import ExecutionStep, TextStep

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")


async def solve(backend: Any, problem: Problem, **limits: Any) -> Trajectory:
    episode = Episode(problem, backend=backend, template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=10)),
                      config=SolveConfig(limits=Limits(**limits)))
    events = [e async for e in episode.run()]
    assert isinstance(events[-1], Finished)
    return events[-1].trajectory


@pytest.mark.model
async def test_llamacpp_records_exactly_the_sequence_it_evaluated_around_a_real_output_block() -> None:
    backend = load_backend("embedded-tiny")
    assert isinstance(backend, LlamaCppBackend)
    evaluated = []  # how many tokens each llama.cpp eval read: the prefix cache must keep working
    real_eval = backend._llm.eval

    def counting_eval(tokens: Any) -> None:
        evaluated.append(len(tokens))
        real_eval(tokens)

    backend._llm.eval = counting_eval
    t = await solve(backend, Problem(id="natalia", text=NATALIA), max_tool_calls=2, max_tokens=400)
    check_token_invariant(t, backend)
    kinds = [s.type for s in t.steps]
    assert "execution" in kinds and kinds[-1] == "text", "the model wrote no code, or stopped at its output"
    first = t.steps[0]
    assert isinstance(first, TextStep) and first.stop is not None
    assert first.stop.kind == "stop_string" and first.stop.string in (fences.OUTPUT_FENCE, fences.CLOSE_FENCE)
    # The model's text after the output block decodes from its own ids, and the
    # whole response decodes to the completion the record holds.
    assert backend.detokenize((t.token_sequence() or [])[len(t.prompt_ids or []) :]) == t.completion()
    # The model read the whole prompt once, then only what each call added.
    seq = t.token_sequence() or []
    assert sum(evaluated) <= len(seq) + 8 * len(kinds), (sum(evaluated), len(seq))
    ident = t.generation
    assert ident.model_id is not None and ident.model_id.kind == "gguf" and len(ident.model_id.sha256) == 64
    assert ident.tokenizer is not None and len(ident.tokenizer.vocab_sha256) == 64
    again = Trajectory.model_validate_json(t.model_dump_json())
    assert again.token_sequence() == seq
    # The rl row's mask: its 0-runs decode to exactly the output blocks, its 1-runs to the model's text.
    row = rl_row(t)
    assert row is not None and row.prompt_ids == t.prompt_ids and row.response_logprobs is not None
    runs = [(mask, [i for i, _ in group]) for mask, group in
            itertools.groupby(zip(row.response_ids, row.response_mask, strict=True), key=lambda p: p[1])]
    assert [backend.detokenize(ids) for mask, ids in runs if mask == 0] == [
        s.observation for s in t.steps if isinstance(s, ExecutionStep)]
    assert "".join(backend.detokenize(ids) for mask, ids in runs if mask == 1) == "".join(
        s.content for s in t.steps if isinstance(s, TextStep))
    assert all(lp == 0.0 for lp, m in zip(row.response_logprobs, row.response_mask, strict=True) if m == 0)


@pytest.mark.model
async def test_a_stop_string_inside_a_token_keeps_the_whole_token() -> None:
    backend = load_backend("embedded-tiny")
    ids: list[int] = []
    logprobs: list[float] = []
    text, done = "", None
    request = GenerationRequest(prompt="The quick brown fox jumps over the lazy", stop=["o"], max_tokens=32)
    async for event in checked_stream(backend, request):
        if isinstance(event, Delta):
            text += event.text
            ids += event.token_ids
            logprobs += event.logprobs or ()
        else:
            done = event
    assert isinstance(done, Done) and (done.stop, done.stop_string) == ("stop_string", "o")
    assert "o" not in text and done.tail.startswith("o") and len(done.tail) > 1  # " dog": the stop is mid-token
    assert backend.detokenize(ids) == text + done.tail and len(logprobs) == len(ids)
    # The same call fed as ids (the token path) samples the same tokens.
    again: list[int] = []
    prompt_ids = tuple(backend.encode_prompt(request.prompt))
    async for event in checked_stream(backend, GenerationRequest(prompt="", prompt_ids=prompt_ids, stop=["o"],
                                                                 max_tokens=32)):
        if isinstance(event, Delta):
            again += event.token_ids
    assert again == ids and backend.evaluated_ids() == [*prompt_ids, *ids][:-1]


async def test_a_text_backend_takes_the_text_path_and_records_no_tokens(tmp_path: Path) -> None:
    path = write_released(tmp_path / "r.jsonl", [{"idx": "p1", "question": "Q?", "code": [
        "```python\nprint(6 * 7)\n```\n```output\n42\n```\nSo $\\boxed{42}$."]}])
    t = await solve(ReplayBackend(path), Problem(id="p1", text="Q?"))
    assert t.generation.token_path == "text" and t.prompt_ids is None and t.token_sequence() is None
    texts = [s for s in t.steps if isinstance(s, TextStep)]
    assert all(s.token_ids is None and s.logprobs is None for s in texts)
    # The stop that fired is recorded on every path.
    assert texts[0].stop is not None and (texts[0].stop.kind, texts[0].stop.string) == ("stop_string", fences.CLOSE_FENCE)
    assert texts[-1].stop is not None and texts[-1].stop.kind == "eos"
    assert t.completion() == "```python\nprint(6 * 7)\n```\n```output\n42\n```\nSo $\\boxed{42}$."

