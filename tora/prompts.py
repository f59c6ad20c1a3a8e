"""Prompt templates, stored as files under prompts/ and selected by name.

A template file is TOML front matter between `+++` lines (kind, stop strings,
description) followed by the body. `completion` templates put the question
where `{question}` stands; `chat` templates are a system message, with the
question as the user message, rendered by the model's own chat template.
The trajectory records the template's name and the sha256 of its file.
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tora.errors import PromptError

PLACEHOLDER = "{question}"
DEFAULT_PROMPT = "tora-gsm8k"
# Data sets whose problems are competition maths: a base model gets ToRA's MATH few-shot prompt.
MATH_SETS = frozenset({"math", "math500", "aime24", "amc23", "minerva_math", "olympiadbench"})


def default_prompt(spec: str | None, dataset: str | None = None) -> str:
    """The prompt a run uses when --prompt names none: an embedded model's own
    (tora/embedded_models.py), else ToRA's few-shot prompt for the kind of data set."""
    from tora import embedded_models

    math = dataset in MATH_SETS
    model = embedded_models.MODELS.get((spec or embedded_models.DEFAULT).strip())
    if model is not None:
        return model.math_prompt if math else model.prompt
    return "tora-math" if math else DEFAULT_PROMPT


def prompt_dirs() -> list[Path]:
    """A source checkout's prompts/ first, then the copy installed with the wheel."""
    return [
        Path(__file__).resolve().parent.parent / "prompts",
        Path(sys.prefix) / "share" / "tora" / "prompts",
    ]


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    kind: Literal["completion", "chat"]
    body: str
    sha256: str
    stop: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def prefix(self) -> str:
        """The part before the question: identical for every problem, so its
        KV cache can be computed once and reused."""
        return self.body.split(PLACEHOLDER, 1)[0] if self.kind == "completion" else ""

    def fill(self, question: str) -> str:
        return self.body.replace(PLACEHOLDER, question.strip(), 1)

    def messages(self, question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.body.strip()}, {"role": "user", "content": question.strip()}]


def parse_template(name: str, raw: bytes, source: str) -> PromptTemplate:
    text = raw.decode("utf-8")
    meta: dict[str, object] = {}
    if text.startswith("+++\n"):
        head, sep, body = text[4:].partition("\n+++\n")
        if not sep:
            raise PromptError(f"{source}: front matter opened with +++ is never closed")
        try:
            meta = tomllib.loads(head)
        except tomllib.TOMLDecodeError as exc:
            raise PromptError(f"{source}: front matter is not valid TOML ({exc})") from exc
    else:
        body = text
    kind = meta.get("kind", "completion")
    if kind not in ("completion", "chat"):
        raise PromptError(f"{source}: field 'kind' must be 'completion' or 'chat', not {kind!r}")
    stop = meta.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise PromptError(f"{source}: field 'stop' must be a list of strings")
    if kind == "completion" and PLACEHOLDER not in body:
        raise PromptError(f"{source}: a completion template needs the placeholder {PLACEHOLDER}")
    return PromptTemplate(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        body=body,
        sha256=hashlib.sha256(raw).hexdigest(),
        stop=list(stop),
        description=str(meta.get("description", "")),
    )


def available() -> list[str]:
    names: set[str] = set()
    for d in prompt_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.md"))
    return sorted(names)


def load_prompt(name_or_path: str) -> PromptTemplate:
    """A template by name (prompts/NAME.md) or by path to a template file."""
    path = Path(name_or_path)
    if path.suffix and path.is_file():
        return parse_template(path.stem, path.read_bytes(), str(path))
    for d in prompt_dirs():
        candidate = d / f"{name_or_path}.md"
        if candidate.is_file():
            return parse_template(name_or_path, candidate.read_bytes(), str(candidate))
    raise PromptError(f"unknown prompt {name_or_path!r}; choose one of: {', '.join(available())} (or a path to a file)")
