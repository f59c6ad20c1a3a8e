"""The trajectory record: the canonical, lossless form of one solve.

Every training format is a pure function of a `Trajectory`. The invariant that
makes that true: concatenating `prompt` with each step's `context_text()` gives
back, byte for byte, the text the model was conditioned on at the end.

- a `text` step holds exactly what the model emitted in one call (fences
  included), so nothing about its formatting is lost;
- a `code` step holds the code that was executed (parsed from the text before
  it), for consumers that want the program without re-parsing;
- an `execution` step holds the structured result and `observation`, the exact
  text appended to the model's context (the ```output block).

Field names `problem.id`, `sample_index`, `steps`, `result.final_answer` and
`result.finish` are a public interface: scripts depend on them.

Tokens (1.2). On a backend that samples tokens itself (llama.cpp,
transformers, vLLM in process) the loop runs the *token path*
(`generation.token_path == "tokens"`) and records the exact sequence the model
was fed: `prompt_ids`, then each text step's `token_ids` (what it sampled,
with `logprobs`) and each execution step's `observation_ids` (the output block,
tokenised once when it was appended). The token invariant:

    prompt_ids + concat(text steps' token_ids, execution steps' observation_ids)
        == the sequence the backend evaluated (its last call's prompt and samples)
    detokenize(text step's token_ids) == text step's content

A stop string can end inside a token (the token "```output\n" holds the stop
"```output"). The sampled ids are what they are, so a text step keeps the
*whole* token that completed the stop: its `content` ends with the stop string
and whatever else that token held, and the observation starts after it (e.g.
content "...```output\n", observation "2\n```\n"). The text invariant above
therefore still holds, and the stop string the model wrote is trained on
(mask 1) while the output block's tokens are not (mask 0). This holds
wherever the backend streams token ids, on either path; from a backend without
ids (replay, an OpenAI chat server; every record before 1.2) a stop string
other than the closing fence is cut from `content`, and the observation starts
with its own ```output line, as before. A model's EOS id, when it samples one,
is the last id of its text step; it has no text.

Absent is null: `prompt_ids`, `token_ids`, `logprobs` and `observation_ids`
are null where the backend gave none (text path, replay, older records).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# 1.1: result.error is a typed object (kind, message, traceback), not a string;
# generation.run_on records when code runs; a teacher's continuation of another
# trajectory (origin "teacher_corrected") names it in `parent` and says in
# `prefix_lines` how many lines of the parent's completion it starts from.
# 1.0 records are read as they were.
# 1.2: token ids and logprobs (see above), the stop that fired per text step,
# the tokenizer's and the model's identity; 1.0 and 1.1 records read with
# those fields null.
# 1.3: `kernel_state` (how the kernel of a trajectory that starts from a prefix
# got the prefix's state: a fork of a kernel holding it, or its cells re-run,
# and which cells came out differently) and `shared_prefix` (the samples of a
# problem that branch from one generated prefix, `tora curate
# --branch-after-cell`); both optional, null in every earlier record.
SCHEMA_VERSION = "1.3"

Finish = Literal["answered", "no_answer", "max_tool_calls", "max_tokens", "error", "interrupted"]
ExecStatus = Literal["ok", "error", "timeout", "died"]
ErrorKind = Literal["backend", "kernel", "sandbox", "grader", "internal"]
# When a python block runs: at its closing fence ("close", the default), or
# only when the model writes ```output itself ("output", ToRA's protocol).
RunOn = Literal["close", "output"]
# Which stop ended a model call: a stop string (named in `Stop.string`), the model's end of text, the token limit.
StopKind = Literal["stop_string", "eos", "length"]
TokenPath = Literal["tokens", "text"]


class _Record(BaseModel):
    # Readers ignore unknown fields so that a newer minor version stays readable.
    model_config = ConfigDict(extra="ignore")


class Problem(_Record):
    id: str
    text: str
    answer: str | None = None
    source: str | None = None
    split: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class PromptRef(_Record):
    name: str
    sha256: str


class Sampling(_Record):
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 2048
    max_tokens_per_call: int = 1024
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class TokenizerId(_Record):
    """Which tokenizer made the ids: ids from another vocabulary mean nothing."""

    name: str
    vocab_sha256: str  # of the vocabulary: every id's token text (and type), in id order
    chat_template_sha256: str | None = None  # of the chat template text; None: the model has none


class ModelId(_Record):
    """What weights generated: a content hash, not a file name.

    `sha256` is of the GGUF file, or, for a Hugging Face directory, of the
    safetensors index (or the single safetensors file) and the tokenizer files
    (`files`, in the order hashed). Computed once per file version and cached
    by path, size and mtime under $TORA_HOME (`tora.record.identity`).
    """

    kind: Literal["gguf", "safetensors", "other"]
    sha256: str
    files: list[str] = Field(default_factory=list)


class Generation(_Record):
    backend: str
    model: str
    spec: str
    prompt_template: PromptRef
    sampling: Sampling
    max_tool_calls: int
    run_on: RunOn = "output"  # absent from 1.0 records, which all stopped at ```output only
    # 1.2: which path ran ("text" for every record before 1.2), and what made the tokens.
    token_path: TokenPath = "text"
    tokenizer: TokenizerId | None = None
    model_id: ModelId | None = None


class Runtime(_Record):
    executor: str = "ipykernel"
    python: str = ""
    kernel: dict[str, Any] = Field(default_factory=dict)
    render_policy: str = "default"
    fresh_namespace: bool = False
    tora_version: str = ""


class Stop(_Record):
    """The stop that ended a text step's (last) model call."""

    kind: StopKind
    string: str | None = None  # the stop string, when kind is "stop_string"


class TextStep(_Record):
    type: Literal["text"] = "text"
    content: str
    t_start: float = 0.0
    t_end: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop: Stop | None = None  # 1.2
    token_ids: list[int] | None = None  # 1.2, token path: the sampled ids, EOS included
    logprobs: list[float] | None = None  # 1.2: one per token id; None where the backend gives none

    def context_text(self) -> str:
        return self.content


class CodeStep(_Record):
    type: Literal["code"] = "code"
    language: str = "python"
    content: str

    def context_text(self) -> str:
        return ""  # already inside the preceding text step


class ExecError(_Record):
    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


class ExecutionStep(_Record):
    type: Literal["execution"] = "execution"
    status: ExecStatus
    stdout: str = ""
    stderr: str = ""
    display: list[str] = Field(default_factory=list)
    error: ExecError | None = None
    truncated: bool = False
    duration_s: float = 0.0
    render_policy: str = "default"
    rendered: str
    observation: str
    # 1.2, token path: the ids of `observation` as the model received them (tokenised once, when appended).
    observation_ids: list[int] | None = None

    def context_text(self) -> str:
        return self.observation


Step = Annotated[TextStep | CodeStep | ExecutionStep, Field(discriminator="type")]


class ErrorInfo(_Record):
    """Why a trajectory failed. `kind` says whose fault: the model backend, the
    kernel, the sandbox, the grader, or tora itself (`internal`, with the traceback)."""

    kind: ErrorKind
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} error: {self.message}"


class Result(_Record):
    final_answer: str | None = None
    extracted_by: str | None = None
    finish: Finish
    error: ErrorInfo | None = None
    correct: bool | None = None
    grader: str | None = None
    grade_status: str | None = None

    @field_validator("error", mode="before")
    @classmethod
    def _error_from_1_0(cls, value: object) -> object:
        # 1.0 records held "ExcType: message"; the kind was not recorded.
        return {"kind": "internal", "message": value} if isinstance(value, str) else value


class Stats(_Record):
    tool_calls: int = 0
    exec_errors: int = 0
    wall_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class KernelState(_Record):
    """1.3: how the kernel of a trajectory that starts from a prefix came to hold the prefix's state.

    Absent (null) where the trajectory's kernel ran every cell of its record itself.
    """

    # "fork": a copy (a snapshot of its names, RNG state, cwd and files) of a kernel that held the
    # prefix's state; "replay": the prefix's cells re-run in order in this trajectory's kernel.
    method: Literal["fork", "replay"]
    cells: int = 0  # the prefix's cells the state holds
    reason: str = ""  # why a replay where a fork was tried or possible
    # Indexes (among the prefix's cells) of cells whose outcome, where they ran to make this state,
    # differs from the recorded output: randomness, time, files. Empty for a fork of the kernel
    # that produced the record.
    diverged: list[int] = Field(default_factory=list)
    snapshot_bytes: int = 0  # of the fork's snapshot


class SharedPrefix(_Record):
    """1.3: the first steps this trajectory shares, verbatim, with the other samples of its problem."""

    sample_index: int  # the sample whose generation made the prefix
    steps: int  # how many of `steps` are the shared prefix


class Trajectory(_Record):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    schema_version: str = SCHEMA_VERSION
    run_id: str | None = None
    created_at: str = Field(default_factory=_now)
    problem: Problem
    sample_index: int = 0
    origin: Literal["greedy", "sampled", "teacher_corrected", "interactive", "replayed"] = "greedy"
    parent: str | None = None  # the trajectory this one continues (teacher_corrected)
    prefix_lines: int | None = None  # lines of the parent's completion kept before the continuation
    shared_prefix: SharedPrefix | None = None  # 1.3: branched from a prefix shared by the problem's samples
    kernel_state: KernelState | None = None  # 1.3: how its kernel got its prefix's state
    generation: Generation
    runtime: Runtime
    prompt: str
    prompt_ids: list[int] | None = None  # 1.2, token path: the ids of `prompt` the model read
    steps: list[Step] = Field(default_factory=list)
    result: Result
    stats: Stats = Field(default_factory=Stats)
    content_hash: str = ""

    def completion(self) -> str:
        """The model's side plus observations, as it stood in the context."""
        return "".join(step.context_text() for step in self.steps)

    def context(self) -> str:
        return self.prompt + self.completion()

    def token_sequence(self) -> list[int] | None:
        """prompt_ids + every step's ids in order: the exact sequence the model
        was fed (see the token invariant); None when the record has no tokens."""
        return token_sequence(self.prompt_ids, self.steps)

    def compute_content_hash(self) -> str:
        """Dedupe key: the normalised problem text and the rendered steps."""
        payload = json.dumps([" ".join(self.problem.text.split()), self.completion()])
        return hashlib.sha256(payload.encode()).hexdigest()


def token_sequence(prompt_ids: Sequence[int] | None, steps: Sequence[Step]) -> list[int] | None:
    """`prompt_ids` + the ids of each of `steps` in order; None where any is missing."""
    if prompt_ids is None:
        return None
    ids = list(prompt_ids)
    for step in steps:
        if isinstance(step, TextStep):
            if step.token_ids is None:
                return None
            ids += step.token_ids
        elif isinstance(step, ExecutionStep):
            if step.observation_ids is None:
                return None
            ids += step.observation_ids
    return ids


def check_version(raw: dict[str, Any]) -> None:
    """Reject records whose major version this reader does not know."""
    version = str(raw.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(f"schema_version {version!r} is not supported (this tora reads {SCHEMA_VERSION})")


SCHEMA_FILE = Path(__file__).with_name("trajectory.schema.json")


def json_schema_text() -> str:
    """The JSON Schema of a trajectory record, as published in `trajectory.schema.json`."""
    schema = Trajectory.model_json_schema()
    schema["$id"] = f"https://tora.invalid/trajectory-{SCHEMA_VERSION}.schema.json"
    schema["title"] = f"tora trajectory record {SCHEMA_VERSION}"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m tora.record.schema: regenerate the published file
    SCHEMA_FILE.write_text(json_schema_text())
