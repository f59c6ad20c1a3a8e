"""Any local Hugging Face model directory through transformers (CPU or GPU).

Install with the `hf` extra. On a CPU machine install torch first
(`pip install torch==2.13.0`) so that no CUDA build is pulled in.

It takes token ids (`accepts_token_ids`) and decodes with its own loop over
the model's forward pass (a KV cache within a call), not `generate()`: each
step's raw logits give the sampled token's logprob exactly (see
`tora.backends.base`), the stop scanner sees every token, and a cancelled
stream stops at the next one. Sampling: greedy at temperature 0, else
softmax(logits / T) cut to the top_p nucleus, drawn from a generator seeded
with the request's seed.

`TransformersBackend.from_model` wraps a model already in memory (a
trainer's policy, whose weights change between calls: generation always uses
them as they are at the call).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from collections.abc import AsyncGenerator, Generator
from pathlib import Path
from typing import Any

from tora.backends.base import Done, FinishReason, GenerationRequest, StreamEvent
from tora.backends.hf_tokens import HFTokenizerBackend
from tora.backends.threaded import Sampled, stream_in_thread
from tora.errors import BackendError, ModelSpecError
from tora.record import identity
from tora.record.schema import ModelId, TokenizerId


def _import_torch() -> Any:
    try:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # quiet stderr
    except ImportError as exc:
        raise BackendError(
            "the transformers backend needs the hf extra: pip install torch==2.13.0 'tora-tir[hf]'"
        ) from exc
    return torch


class TransformersBackend(HFTokenizerBackend):
    name = "transformers"
    accepts_token_ids = True

    def __init__(self, path: Path, *, device: str | None = None) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is not a Hugging Face model directory (no config.json)")
        torch = _import_torch()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model: Any = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, torch_dtype="auto"
            ).to(device)  # type: ignore[arg-type]
        except Exception as exc:
            raise ModelSpecError(f"{path}: transformers could not load this model ({exc})") from exc
        model.eval()
        self._setup(model, tokenizer, name=path.name, path=path)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, name: str, path: Path | None = None) -> TransformersBackend:
        """A backend over a model in memory, used as it is at each call (its mode,
        device and current weights). `path`, if the weights came from a
        directory, gives the record a model identity; a live model has none."""
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, name=name, path=path)
        return backend

    def _setup(self, model: Any, tokenizer: Any, *, name: str, path: Path | None) -> None:
        self._torch = _import_torch()
        self._model = model
        self.tokenizer = tokenizer
        self.device = str(next(model.parameters()).device)
        self.model = name
        self.path = path
        self._lock = asyncio.Lock()
        ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos = eos
        self._fed: list[int] = []  # the ids the model's forward passes read in the last call
        self._identity_lock = threading.Lock()
        self._tokenizer_id: TokenizerId | None = None
        self._model_id: ModelId | None = None

    def evaluated_ids(self) -> list[int] | None:
        return list(self._fed)

    def tokenizer_identity(self) -> TokenizerId | None:
        with self._identity_lock:
            if self._tokenizer_id is None:
                vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                template = getattr(self.tokenizer, "chat_template", None)
                self._tokenizer_id = TokenizerId(
                    name=Path(str(getattr(self.tokenizer, "name_or_path", "") or self.model)).name,
                    vocab_sha256=hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest(),
                    chat_template_sha256=identity.sha256_text(template) if isinstance(template, str) else None)
            return self._tokenizer_id

    def model_identity(self) -> ModelId | None:
        if self.path is None:
            return None  # a live model's weights change: no hash says which they were
        with self._identity_lock:
            if self._model_id is None:
                self._model_id = identity.hf_identity(self.path)
            return self._model_id

    # -- generation ---------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        async with self._lock:
            ids = list(request.prompt_ids) if request.prompt_ids is not None else self.encode_prompt(request.prompt)
            n_prompt = len(ids)
            limit = getattr(self._model.config, "max_position_embeddings", None)
            budget = request.max_tokens if limit is None else min(request.max_tokens, int(limit) - n_prompt)
            if budget <= 0:
                yield Done("length", None, n_prompt, 0)
                return
            ended = {"reason": "length"}

            def produce(cancel: threading.Event) -> Generator[Sampled, None, None]:
                torch = self._torch
                generator = torch.Generator(device=self.device)
                if request.seed is not None:
                    generator.manual_seed(request.seed)
                else:
                    generator.seed()
                self._fed = []
                sampled: list[int] = []
                emitted = ""
                feed = torch.tensor([ids], device=self.device)
                past: Any = None
                with torch.inference_mode():
                    for _ in range(budget):
                        out = self._model(input_ids=feed, past_key_values=past, use_cache=True)
                        self._fed += feed[0].tolist()
                        past = out.past_key_values
                        token, logprob, top = self._sample(out.logits[0, -1].float(), request, generator)
                        sampled.append(token)
                        eos = token in self._eos
                        # Decoding the whole call each time keeps the pieces exact (a
                        # token's text can depend on its neighbours); an incomplete
                        # UTF-8 character waits for the next token.
                        text = self.detokenize(sampled)
                        last = eos or len(sampled) == budget
                        piece = "" if text.endswith("\ufffd") and not last else text[len(emitted) :]
                        emitted += piece
                        yield Sampled(piece, token, logprob, top)
                        if eos:
                            ended["reason"] = "eos"
                            return
                        if cancel.is_set():
                            return
                        feed = torch.tensor([[token]], device=self.device)

            def natural_finish() -> FinishReason:
                return "eos" if ended["reason"] == "eos" else "length"

            # aclosing: finish the worker before releasing the lock (see llamacpp.py).
            async with contextlib.aclosing(
                stream_in_thread(produce, request.stop, prompt_tokens=n_prompt, natural_finish=natural_finish)
            ) as events:
                async for event in events:
                    yield event

    def _sample(self, logits: Any, request: GenerationRequest,
                generator: Any) -> tuple[int, float | None, dict[int, float] | None]:
        torch = self._torch
        scaled = logits / request.temperature if request.temperature > 0 else logits
        logprobs = torch.log_softmax(scaled, dim=-1)
        if request.temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            probs = logprobs.exp()
            if request.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                outside = torch.cumsum(ordered, 0) - ordered > request.top_p  # the nucleus keeps its first token
                probs = torch.zeros_like(probs).scatter(0, order, ordered.masked_fill(outside, 0.0))
            token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        top = None
        if request.top_logprobs > 0 and request.logprobs:
            values, best = torch.topk(logprobs, request.top_logprobs)
            top = {int(i): float(v) for i, v in zip(best.tolist(), values.tolist(), strict=True)}
        return token, float(logprobs[token]) if request.logprobs else None, top

    async def aclose(self) -> None:
        return None
