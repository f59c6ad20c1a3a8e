"""`TokenServerBackend`: tora's token path over a trainer's token-in/token-out server (verl's
`LLMServerClient.generate`). The server here answers with scripted ids, the way vLLM does with
stop strings (generation ends on the token that completes one, which is returned); the
tokenizer is a real byte-level one, so a character can span several tokens. The backend
against verl's real classes and a real model: tests/test_rl_verl.py (in .venv-verl)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import collect

from tora.backends.base import GenerationRequest
from tora.rl.server_backend import TokenServerBackend, token_pieces


def byte_tokenizer() -> Any:
    pytest.importorskip("transformers")
    from tiny_hf import tokenizer

    return tokenizer()


class ScriptedServer:
    def __init__(self, tok: Any, text: str, eos: bool = False) -> None:
        self.ids = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])
        self.calls: list[dict[str, Any]] = []

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
        self.calls.append({"request_id": request_id, "prompt_ids": prompt_ids, **sampling_params})
        return SimpleNamespace(token_ids=list(self.ids), log_probs=[-0.5 - i for i in range(len(self.ids))])


def test_pieces_concatenate_to_the_decode_even_across_split_characters() -> None:
    tok = byte_tokenizer()
    text = "é ≥ 3 — ok\n```output\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters span tokens
    pieces = token_pieces(lambda i: tok.decode(i), ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_inside_the_reply_is_cut_with_its_token_kept_and_the_rest_in_the_tail() -> None:
    tok = byte_tokenizer()
    server = ScriptedServer(tok, "x = 2\nprint(x)\n```\nmore")
    backend = TokenServerBackend(server, tok, request_id="r1", extra={"top_k": 20})
    prompt = backend.encode_prompt("Q: two?\n")
    request = GenerationRequest(prompt="", prompt_ids=tuple(prompt), stop=["```\n"], max_tokens=64, temperature=1.0)

    async def go() -> tuple[str, Any, list[int], list[float]]:
        from tora.backends.base import Delta, checked_stream

        ids: list[int] = []
        logprobs: list[float] = []
        async for event in checked_stream(backend, request):
            if isinstance(event, Delta):
                ids += event.token_ids
                logprobs += event.logprobs or []
        text, done = await collect(backend, request)
        return text, done, ids, logprobs

    text, done, ids, logprobs = asyncio.run(go())
    assert text == "x = 2\nprint(x)\n" and done.finish_reason == "stop" and done.stop_string == "```\n"
    assert done.tail == "```\n"
    # Every id up to the one that completed the stop, none after; their logprobs as the server gave them.
    assert backend.detokenize(ids) == text + done.tail
    assert logprobs == [-0.5 - i for i in range(len(ids))]
    assert backend.evaluated_ids() == prompt + ids
    call = server.calls[0]
    assert call["prompt_ids"] == prompt and call["stop"] == ["```\n"] and call["top_k"] == 20
    assert call["logprobs"] is True and call["max_tokens"] == 64 and call["request_id"] == "r1"


def test_eos_and_length_are_told_apart() -> None:
    tok = byte_tokenizer()
    eos = TokenServerBackend(ScriptedServer(tok, "done", eos=True), tok, request_id="a")
    _, done = asyncio.run(collect(eos, GenerationRequest(prompt="Q", max_tokens=64)))
    assert done.finish_reason == "eos" and done.completion_tokens == 5
    cut = TokenServerBackend(ScriptedServer(tok, "abcd"), tok, request_id="b")
    text, done = asyncio.run(collect(cut, GenerationRequest(prompt="Q", max_tokens=4)))
    assert text == "abcd" and done.finish_reason == "length"
