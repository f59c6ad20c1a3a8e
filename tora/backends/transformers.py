"""Any local Hugging Face model directory through transformers (CPU or GPU).

Install with the `hf` extra. On a CPU machine install torch first
(`pip install torch==2.13.0`) so that no CUDA build is pulled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Generator
from pathlib import Path
from typing import Any

from tora.backends.base import Backend, Done, FinishReason, GenerationRequest, StreamEvent
from tora.backends.threaded import stream_in_thread
from tora.errors import BackendError, ModelSpecError, PromptError


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, path: Path, *, device: str | None = None) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is not a Hugging Face model directory (no config.json)")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # quiet stderr
        except ImportError as exc:
            raise BackendError(
                "the transformers backend needs the hf extra: pip install torch==2.13.0 'tora-tir[hf]'"
            ) from exc
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model: Any = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, torch_dtype="auto"
            ).to(self.device)  # type: ignore[arg-type]
        except Exception as exc:
            raise ModelSpecError(f"{path}: transformers could not load this model ({exc})") from exc
        self._model.eval()
        self.model = path.name
        self._lock = asyncio.Lock()

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError(f"{self.model} has no chat template; use a completion prompt (e.g. --prompt tora-gsm8k)")
        text: str = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        async with self._lock:
            inputs = self.tokenizer(request.prompt, return_tensors="pt").to(self.device)
            n_prompt = int(inputs["input_ids"].shape[1])
            limit = getattr(self._model.config, "max_position_embeddings", None)
            budget = request.max_tokens if limit is None else min(request.max_tokens, int(limit) - n_prompt)
            if budget <= 0:
                yield Done("length", None, n_prompt, 0)
                return
            produced = {"tokens": 0}

            def produce(cancel: threading.Event) -> Generator[tuple[str, int], None, None]:
                class _Cancel(StoppingCriteria):  # type: ignore[misc]
                    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                        produced["tokens"] = int(input_ids.shape[1]) - n_prompt
                        return cancel.is_set()

                streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
                kwargs: dict[str, Any] = dict(
                    inputs,
                    max_new_tokens=budget,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancel()]),
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
                if request.temperature > 0:
                    kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
                    if request.seed is not None:
                        self._torch.manual_seed(request.seed)
                else:
                    kwargs.update(do_sample=False)
                thread = threading.Thread(target=self._model.generate, kwargs=kwargs, daemon=True)
                thread.start()
                try:
                    for piece in streamer:
                        yield piece, 0
                finally:
                    # Stop generate() if we left early (stop string or cancel).
                    cancel.set()
                    thread.join()

            def natural_finish() -> FinishReason:
                return "length" if produced["tokens"] >= budget else "eos"

            # aclosing: finish the worker before releasing the lock (see llamacpp.py).
            async with contextlib.aclosing(
                stream_in_thread(produce, request.stop, prompt_tokens=n_prompt, natural_finish=natural_finish)
            ) as events:
                async for event in events:
                    if isinstance(event, Done):
                        event = Done(event.finish_reason, event.stop_string, n_prompt, produced["tokens"])
                    yield event

    async def aclose(self) -> None:
        return None
