"""The token methods of a backend over a Hugging Face tokenizer (transformers, vLLM, a
trainer's token server): one place for how prompts, output blocks and ids convert."""

from __future__ import annotations

from typing import Any

from tora.backends.base import Backend
from tora.errors import PromptError


class HFTokenizerBackend(Backend):
    tokenizer: Any  # a transformers tokenizer

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError(f"{self.model} has no chat template; use a completion prompt (e.g. --prompt tora-gsm8k)")
        text: str = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def encode_prompt(self, text: str) -> list[int]:
        # A chat template already wrote the BOS token: do not add a second one.
        bos = getattr(self.tokenizer, "bos_token", None)
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
        return ids

    def tokenize(self, text: str) -> list[int]:
        # An output block: no BOS, and special-token text stays text (tool output cannot forge one).
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text
