"""Builds and exercises a tiny, randomly initialised Llama model for the
transformers backend test. Run as a script in its own process: torch and
llama.cpp loaded into one process abort (clashing OpenMP runtimes), and the
test suite loads llama.cpp."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


def build(out: Path) -> None:
    import torch
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


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        check(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
