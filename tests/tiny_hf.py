"""Builds and exercises a tiny, randomly initialised Llama model for the
transformers backend test. Run as a script in its own process: torch and
llama.cpp loaded into one process abort (clashing OpenMP runtimes), and the
test suite loads llama.cpp."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def tokenizer() -> object:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE with no merges: every byte is a token, text round-trips.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    return fast


def build(out: Path) -> None:
    import torch
    import transformers

    fast: Any = tokenizer()
    vocab = fast.get_vocab()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=4096, eos_token_id=vocab["<eos>"])
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)


async def collect(backend: object, **kw: object) -> dict[str, object]:
    from tora.backends.base import Delta, GenerationRequest

    text, done = "", None
    async for ev in backend.stream(GenerationRequest(**kw)):  # type: ignore[attr-defined]
        if isinstance(ev, Delta):
            text += ev.text
        else:
            done = ev
    return {"text": text, "done": vars(done) if done else None}


def check(model_dir: Path, stop: str | None) -> None:
    from tora.backends.registry import load_backend

    backend = load_backend(f"hf:{model_dir}")
    kw: dict[str, object] = {"prompt": "Question: 1+1?", "max_tokens": 40}
    if stop:
        kw["stop"] = [stop]
    result = asyncio.run(collect(backend, **kw))
    result["name"] = backend.name
    result["chat"] = backend.format_chat([{"role": "user", "content": "hi"}])
    print(json.dumps(result))


async def _tokens(model_dir: Path) -> dict[str, object]:
    """The token invariant (tests/token_checks.py) on an episode, then around a
    real output block: two calls with a real kernel's rendered output between them."""
    from token_checks import check_token_invariant

    from tora.backends.base import Delta, GenerationRequest, checked_stream
    from tora.backends.transformers import TransformersBackend
    from tora.engine import Episode, Limits, SolveConfig
    from tora.events import Finished
    from tora.kernels import FreshKernels, SandboxPolicy
    from tora.prompts import load_prompt
    from tora.record import Problem
    from tora.render import get_renderer, observation

    backend = TransformersBackend(model_dir)
    episode = Episode(Problem(id="p", text="1+1?"), backend=backend, template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=10)),
                      config=SolveConfig(limits=Limits(max_tokens=24)))
    events = [e async for e in episode.run()]
    assert isinstance(events[-1], Finished)
    t = events[-1].trajectory
    check_token_invariant(t, backend)

    async def call(ids: list[int], n: int) -> list[int]:
        out: list[int] = []
        async for ev in checked_stream(backend, GenerationRequest(prompt="", prompt_ids=tuple(ids), max_tokens=n)):
            if isinstance(ev, Delta):
                out += ev.token_ids
        return out

    kernels = FreshKernels(SandboxPolicy(timeout_s=10))
    kernel = await kernels.acquire()
    try:
        cell = await kernel.execute("print(6 * 7)", timeout=10)
    finally:
        await kernels.release(kernel)
    prompt = backend.encode_prompt("Question: 1+1?\n```python\nprint(6 * 7)\n```\n")
    first = await call(prompt, 6)
    block = backend.tokenize(observation(get_renderer("default")(cell, 10), "\n"))
    second = await call([*prompt, *first, *block], 6)
    return {"steps": len(t.steps), "token_path": t.generation.token_path, "tokenizer": t.generation.tokenizer is not None,
            "model_id": t.generation.model_id is not None,
            "around_block": backend.evaluated_ids() == [*prompt, *first, *block, *second][:-1],
            "block_text": backend.detokenize(block)}


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    elif sys.argv[1] == "tokenizer":
        tokenizer().save_pretrained(sys.argv[2])  # type: ignore[attr-defined]
    elif sys.argv[1] == "tokens":
        print(json.dumps(asyncio.run(_tokens(Path(sys.argv[2])))))
    else:
        check(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
