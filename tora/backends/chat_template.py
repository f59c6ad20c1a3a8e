"""A model's chat template, rendered here rather than by a server.

llama.cpp reads the template from the GGUF file; an OpenAI-compatible server
continuing an assistant message through `/v1/completions` needs it from a
local file, since tora never downloads one. `load()` takes, offline:

    a GGUF file               its `tokenizer.chat_template` metadata
    a Hugging Face model dir  its chat_template.jinja or tokenizer_config.json
    a tokenizer_config.json   its `chat_template`, `bos_token`, `eos_token`
    any other file            the Jinja template itself (no BOS/EOS tokens)

Rendering is llama-cpp-python's Jinja2 formatter (sandboxed, transformers'
filters), the one the llama.cpp backend uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tora.errors import ModelSpecError, PromptError


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # where it came from, for error messages
    template: str
    bos: str = ""
    eos: str = ""

    def render(self, messages: list[dict[str, str]]) -> str:
        """The messages in the model's format, ending ready for the assistant.

        A leading BOS token is left out: whatever tokenises the prompt (llama.cpp,
        a server's completions endpoint) adds its own, and two would change the
        model's input.
        """
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            formatter = Jinja2ChatFormatter(template=self.template, eos_token=self.eos, bos_token=self.bos)
            prompt: str = formatter(messages=messages).prompt  # type: ignore[arg-type]
        except jinja2.TemplateError as exc:
            raise PromptError(f"{self.source}: the chat template failed: {exc}") from exc
        return prompt.removeprefix(self.bos) if self.bos else prompt


def from_llama(llm: Any, source: str) -> ChatTemplate | None:
    """The template a loaded llama_cpp.Llama carries, or None."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos = llm.detokenize([llm.token_eos()]).decode(errors="ignore")
    bos = llm.detokenize([llm.token_bos()]).decode(errors="ignore")
    return ChatTemplate(source, template, bos, eos)


def _token(value: object) -> str:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _from_tokenizer_config(path: Path, template_file: Path | None) -> ChatTemplate:
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"{path}: not a readable tokenizer_config.json ({exc})") from exc
    template: object = template_file.read_text() if template_file is not None else config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ModelSpecError(f"{path}: no chat template (field 'chat_template')")
    source = str(template_file or path)
    return ChatTemplate(source, template, _token(config.get("bos_token")), _token(config.get("eos_token")))


def _from_gguf(path: Path) -> ChatTemplate:
    from llama_cpp import Llama

    from tora.backends.ggml_cpu import ensure_cpu_backend

    ensure_cpu_backend()
    try:
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as exc:
        raise ModelSpecError(f"{path}: llama.cpp could not read this GGUF file ({exc})") from exc
    found = from_llama(llm, str(path))
    if found is None:
        raise ModelSpecError(f"{path}: this GGUF file has no chat template (tokenizer.chat_template)")
    return found


def load(path: Path) -> ChatTemplate:
    """A chat template from a local file or model directory (see the module docstring)."""
    path = path.expanduser()
    if path.is_dir():
        jinja = path / "chat_template.jinja"
        return _from_tokenizer_config(path / "tokenizer_config.json", jinja if jinja.is_file() else None)
    if not path.is_file():
        raise ModelSpecError(f"chat template not found: {path}")
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json":
        return _from_tokenizer_config(path, None)
    return ChatTemplate(str(path), path.read_text())
