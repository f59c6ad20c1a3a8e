"""GGUF models through llama.cpp (llama-cpp-python), the CPU engine of choice.

It loads and decodes a small GGUF model on a CPU far faster than
transformers does (benchmarks/bench_embedded.py has the figures). llama.cpp also keeps the KV cache of the longest common token prefix between
calls, so continuing a trajectory after an output block only evaluates the
new tokens.

It takes token ids (`accepts_token_ids`): the loop feeds it the exact
sequence so far, and it streams each sampled id with its logprob, computed
from the logits the token was sampled from (see `tora.backends.base`). It
samples through llama-cpp-python's `generate` with the sampler settings its
`create_completion` uses (top_k 40, min_p 0.05, the request's temperature and
top_p), so the text path samples as before.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import hashlib
import os
import random
import threading
from collections.abc import AsyncGenerator, Generator
from pathlib import Path
from typing import Any

import numpy as np

from tora.backends import chat_template
from tora.backends.base import Backend, Done, FinishReason, GenerationRequest, StreamEvent
from tora.backends.ggml_cpu import ensure_cpu_backend
from tora.backends.threaded import Sampled, stream_in_thread
from tora.errors import BackendError, ModelSpecError, PromptError
from tora.paths import home
from tora.record import identity
from tora.record.schema import ModelId, TokenizerId

# create_completion's sampler settings, which the text path always used.
_TOP_K, _MIN_P = 40, 0.05

_LOG_SINK: object = None


def _silence_llama_log() -> None:
    """llama.cpp writes load notes (e.g. about its SWA cache) straight to
    stderr whatever the verbosity, which pollutes `--json` consumers' streams."""
    global _LOG_SINK
    if _LOG_SINK is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[misc, untyped-decorator]
    def sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    _LOG_SINK = sink  # the C side holds a raw pointer: keep the callback alive
    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    accepts_token_ids = True

    def __init__(self, path: Path, *, n_ctx: int = 8192, n_threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {path}")
        try:
            from llama_cpp import Llama

            _silence_llama_log()
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendError("llama-cpp-python is not installed: run ./setup.sh") from exc
        # Before the first Llama(): pick the CPU variant proven to run here.
        self.cpu_variant = ensure_cpu_backend()
        try:
            self._llm: Any = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads or os.cpu_count() or 1,
                verbose=False,
            )
        except Exception as exc:
            raise ModelSpecError(f"{path}: llama.cpp could not load this file as a GGUF model ({exc})") from exc
        self.model = path.name
        self.path = path
        self.n_ctx = n_ctx
        # One llama.cpp context serves one generation at a time.
        self._lock = asyncio.Lock()
        self._identity_lock = threading.Lock()
        self._tokenizer_id: TokenizerId | None = None
        self._model_id: ModelId | None = None
        self._n_vocab: int = self._llm.n_vocab()
        self._scratch = np.empty(self._n_vocab, dtype=np.float32)  # logprobs without a per-token allocation

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        template = chat_template.from_llama(self._llm, str(self.path))
        if template is None:
            raise PromptError(f"{self.model} has no chat template; use a completion prompt (e.g. --prompt tora-gsm8k)")
        return template.render(messages)

    def prepare(self, prefix: str) -> None:
        """Make `prefix` (a template's text before the question) cost nothing.

        Its KV state is computed once and kept on disk under the user data
        dir; later processes load it instead of re-reading the few-shot
        examples (~0.8 s of prompt evaluation on 2 cores), and llama.cpp's
        prefix matching then evaluates only the question.
        """
        import llama_cpp

        tokens = self.encode_prompt(prefix)
        if len(tokens) < 16:
            return
        st = self.path.stat()
        ident = f"{self.path.name}:{st.st_size}:{st.st_mtime_ns}:{self.n_ctx}:{llama_cpp.__version__}:"
        key = hashlib.sha256(ident.encode() + prefix.encode()).hexdigest()[:32]
        cache = home() / "cache" / "kv" / f"{key}.state"
        ctx = self._llm._ctx.ctx
        if cache.is_file():
            data = cache.read_bytes()
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if llama_cpp.llama_state_set_data(ctx, buf, len(data)) == len(data):
                self._llm.input_ids[: len(tokens)] = tokens
                self._llm.n_tokens = len(tokens)
                self._llm._requires_eval = True  # logits are not restored
                return
        self._llm.reset()
        self._llm.eval(tokens)
        size = llama_cpp.llama_state_get_size(ctx)
        buf = (ctypes.c_uint8 * size)()
        used = llama_cpp.llama_state_get_data(ctx, buf, size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        partial.write_bytes(bytes(buf)[:used])
        os.replace(partial, cache)

    def encode_prompt(self, text: str) -> list[int]:
        # A chat template already wrote the BOS token: do not add a second one.
        bos = self._llm.token_bos()
        ids: list[int] = self._llm.tokenize(text.encode(), add_bos=True, special=True)
        if len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = self._llm.tokenize(text.encode(), add_bos=False, special=False)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        text: str = self._llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")
        return text

    def evaluated_ids(self) -> list[int] | None:
        return [int(i) for i in self._llm.input_ids[: self._llm.n_tokens]]

    def tokenizer_identity(self) -> TokenizerId | None:
        with self._identity_lock:
            if self._tokenizer_id is None:
                meta = self._llm.metadata
                vocab = identity.cached_by_file(self.path, "llama.cpp-vocab", self._vocab_sha256)
                template = meta.get("tokenizer.chat_template")
                name = f"{meta.get('general.name') or self.path.stem} ({meta.get('tokenizer.ggml.model', '?')})"
                self._tokenizer_id = TokenizerId(
                    name=name, vocab_sha256=vocab,
                    chat_template_sha256=identity.sha256_text(template) if template else None)
            return self._tokenizer_id

    def _vocab_sha256(self) -> str:
        import llama_cpp

        vocab = self._llm._model.vocab
        digest = hashlib.sha256()
        for i in range(self._n_vocab):
            digest.update(llama_cpp.llama_vocab_get_text(vocab, i) or b"")
            digest.update(f"\0{int(llama_cpp.llama_vocab_get_attr(vocab, i))}\n".encode())
        return digest.hexdigest()

    def model_identity(self) -> ModelId | None:
        with self._identity_lock:
            if self._model_id is None:
                self._model_id = identity.gguf_identity(self.path)
            return self._model_id

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        async with self._lock:
            tokens = list(request.prompt_ids) if request.prompt_ids is not None else self.encode_prompt(request.prompt)
            budget = min(request.max_tokens, self.n_ctx - len(tokens))
            if budget <= 0:
                yield Done("length", None, len(tokens), 0)
                return
            ended = {"reason": "eos"}

            def produce(cancel: threading.Event) -> Generator[Sampled, None, None]:
                import llama_cpp

                llm = self._llm
                # As create_completion: a given seed, else the next of the model's own sequence.
                llm.set_seed(request.seed if request.seed is not None else random.Random(llm._seed).randint(0, 2**32))
                vocab = llm._model.vocab
                scale = 1.0 / request.temperature if request.temperature > 0 else 1.0
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                tokens_out = llm.generate(tokens, top_k=_TOP_K, top_p=request.top_p, min_p=_MIN_P, typical_p=1.0,
                                          temp=request.temperature, repeat_penalty=1.0)
                try:
                    for n, token in enumerate(tokens_out, 1):
                        logprob, top = None, None
                        if request.logprobs:  # from the logits this token was sampled from
                            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,))
                            logprob, top = self._logprob(logits, token, scale, request.top_logprobs)
                        if llama_cpp.llama_vocab_is_eog(vocab, token):
                            yield Sampled(decoder.decode(b"", final=True), token, logprob, top)
                            return
                        piece = decoder.decode(llm.detokenize([token], special=False))
                        if n >= budget:
                            ended["reason"] = "length"
                            yield Sampled(piece + decoder.decode(b"", final=True), token, logprob, top)
                            return
                        yield Sampled(piece, token, logprob, top)
                        if cancel.is_set():
                            return
                finally:
                    tokens_out.close()
                    self._free_sampler()

            def natural_finish() -> FinishReason:
                return "length" if ended["reason"] == "length" else "eos"

            # aclosing: the worker thread must be finished before the lock is
            # released, even when our consumer stops early; left to the garbage
            # collector, the next generation raced it and llama.cpp aborted.
            async with contextlib.aclosing(
                stream_in_thread(produce, request.stop, prompt_tokens=len(tokens), natural_finish=natural_finish)
            ) as events:
                async for event in events:
                    yield event

    def _logprob(self, logits: Any, token: int, scale: float, k: int) -> tuple[float, dict[int, float] | None]:
        """log softmax(logits * scale)[token], and the k most likely ids when asked.
        Into a preallocated buffer: this runs once per sampled token."""
        z = self._scratch
        top = float(logits.max()) * scale
        if scale == 1.0:  # greedy or T=1: one pass fewer
            np.subtract(logits, top, out=z)
        else:
            np.multiply(logits, scale, out=z)
            np.subtract(z, top, out=z)
        picked = float(z[token])
        np.exp(z, out=z)
        norm = float(np.log(z.sum()))
        if k <= 0:
            return picked - norm, None
        best = np.argpartition(-logits, k)[:k]
        return picked - norm, {int(i): float(logits[i]) * scale - top - norm for i in best}

    def _free_sampler(self) -> None:
        """Free the call's sampler now. llama-cpp-python builds one per completion; it
        holds a vocabulary-sized native buffer (3 MB for Gemma 3) and sits in a
        reference cycle, so only the cyclic GC freed it: a server's RSS grew by
        about 3 MB a call. The next completion builds its own."""
        sampler = getattr(self._llm, "_sampler", None)
        if sampler is not None:
            sampler.close()
            self._llm._sampler = None

    async def aclose(self) -> None:
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()
