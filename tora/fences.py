"""Structural parsing of the model's text: ```python / ```output fences and \\boxed{}.

Decisions are made on structure, never on substrings: a docstring that
mentions "boxed" is code, not an answer, and a completion cut off inside a
code block is not final.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OUTPUT_FENCE = "```output"
# A closing fence on its own line: with the default run-on-close policy the
# model stops here, and a closed python block is run at once.
CLOSE_FENCE = "\n```\n"
_OPEN = re.compile(r"^```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$")
_CLOSE = re.compile(r"^```[ \t]*$")
CODE_LANGS = frozenset({"python", "py", "python3", "ipython"})


@dataclass(frozen=True)
class Block:
    lang: str  # "python", "output", or another tag; "" for an untagged fence
    content: str
    start: int  # offset of the opening fence
    end: int  # offset just past the closing fence line (len(text) if unclosed)
    closed: bool

    @property
    def is_code(self) -> bool:
        return self.lang in CODE_LANGS


def opening_lang(line: str) -> str | None:
    """The language tag if `line` opens a fenced block ("" for a bare fence), else None."""
    m = _OPEN.match(line.strip())
    return m.group(1).lower() if m else None


def blocks(text: str) -> list[Block]:
    """All fenced blocks, in order. Fences must start a line (Markdown rule)."""
    found: list[Block] = []
    pos = 0
    open_at: int | None = None
    lang = ""
    body_start = 0
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if open_at is None:
            m = _OPEN.match(bare)
            if m:
                open_at, lang, body_start = pos, m.group(1).lower(), pos + len(line)
        elif _CLOSE.match(bare):
            found.append(Block(lang, text[body_start:pos], open_at, pos + len(line), True))
            open_at = None
        pos += len(line)
    if open_at is not None:
        found.append(Block(lang, text[body_start:], open_at, len(text), False))
    return found


def code_to_run(segment: str, stopped_at_output: bool) -> str | None:
    """The code block a model call asks us to run, or None.

    `segment` is the text of one model call. The block to run is the last
    python block of the segment, provided nothing but whitespace follows it
    (the model is waiting for output) or the model stopped at ```output.
    An unclosed block counts only when generation stopped at the output fence
    (the model wrote "```output" in place of the closing fence).
    """
    code_blocks = [b for b in blocks(segment) if b.is_code]
    if not code_blocks:
        return None
    last = code_blocks[-1]
    if not last.closed:
        return last.content if stopped_at_output else None
    if stopped_at_output or not segment[last.end :].strip():
        return last.content
    return None


def prose(text: str) -> str:
    """The text with every fenced block removed (code, output, anything)."""
    out: list[str] = []
    pos = 0
    for b in blocks(text):
        out.append(text[pos : b.start])
        pos = b.end
    out.append(text[pos:])
    return "".join(out)


def in_open_block(text: str) -> bool:
    found = blocks(text)
    return bool(found) and not found[-1].closed


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every \boxed{...} (brace-matched) in `text`, in order.

    Also accepts the brace-less form `\boxed 5` that some models write.
    """
    found: list[str] = []
    for m in _BOXED.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                ch = text[j]
                if ch == "\\":
                    j += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        found.append(text[i + 1 : j])
                        break
                j += 1
        else:
            tail = re.match(r"[^\s$]+", text[i:])
            if tail and m.group(0).endswith(" "):
                found.append(tail.group(0))
    return found


def final_boxed(text: str) -> str | None:
    r"""The last \boxed{} answer written in prose (outside every fenced block)."""
    answers = boxed_contents(prose(text))
    return answers[-1].strip() if answers else None
