"""Bounded collection of a cell's output while it is drained from the kernel.

A cell that prints gigabytes must not grow the runtime's memory: keep the first
half of the budget and a rolling tail of the second half, and remember that
something was dropped in between. Sizes are counted in characters plus a fixed
cost per piece, so a flood of empty or one-character messages is bounded too.
"""

from __future__ import annotations

from collections import deque

# Pieces are merged up to this size: a tail of one-character writes costs a
# few strings, not one Python object (~50 bytes) per character.
CHUNK = 4096
# What one display entry costs against the budget beyond its text.
ENTRY_COST = 64


def cap_line(text: str, limit: int = 4000) -> str:
    """One field (an exception's value, a traceback entry) kept within ``limit``: both ends."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ... [{len(text) - 2 * half} characters omitted] ... {text[-half:]}"


class CappedText:
    def __init__(self, budget: int) -> None:
        self._head_budget = budget // 2
        self._tail_budget = budget - self._head_budget
        self._head: list[str] = []
        self._head_len = 0
        self._tail: deque[str] = deque()
        self._tail_len = 0
        self.truncated = False

    def add(self, text: str) -> None:
        if not text:
            return
        room = self._head_budget - self._head_len
        if room > 0 and not self._tail:
            piece = text[:room]
            _append(self._head, piece)
            self._head_len += len(piece)
            text = text[room:]
            if not text:
                return
        if len(text) >= self._tail_budget:
            # Only its end can survive; never hold more than the budget.
            self.truncated = True
            text = text[-self._tail_budget :] if self._tail_budget else ""
            self._tail.clear()
            self._tail_len = 0
            if text:
                self._tail.append(text)
                self._tail_len = len(text)
            return
        _append(self._tail, text)
        self._tail_len += len(text)
        while self._tail_len > self._tail_budget:
            excess = self._tail_len - self._tail_budget
            first = self._tail[0]
            self.truncated = True
            if len(first) <= excess:
                self._tail.popleft()
                self._tail_len -= len(first)
            else:
                self._tail[0] = first[excess:]
                self._tail_len -= excess

    def text(self, marker: str = "\n... [output truncated] ...\n") -> str:
        head = "".join(self._head)
        tail = "".join(self._tail)
        return head + marker + tail if self.truncated else head + tail


def _append(pieces: list[str] | deque[str], text: str) -> None:
    if pieces and len(pieces[-1]) < CHUNK:
        pieces[-1] += text
    else:
        pieces.append(text)


class OutputBudget:
    """Shared budget for stdout, stderr and display of one cell."""

    def __init__(self, budget: int) -> None:
        # Split so one noisy stream cannot push out the others entirely.
        self.stdout = CappedText(budget // 2)
        self.stderr = CappedText(budget // 4)
        self._display_budget = budget - budget // 2 - budget // 4
        self.display: list[str] = []
        self._display_used = 0
        self._display_truncated = False

    def add_display(self, text: str) -> None:
        room = self._display_budget - self._display_used - ENTRY_COST
        if room <= 0:
            self._display_truncated = True
            return
        if len(text) > room:
            text = text[:room] + "..."
            self._display_truncated = True
        self.display.append(text)
        self._display_used += len(text) + ENTRY_COST

    def stderr_text(self) -> str:
        return self.stderr.text()

    @property
    def truncated(self) -> bool:
        return self.stdout.truncated or self.stderr.truncated or self._display_truncated
