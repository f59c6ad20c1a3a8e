"""What tora's lm-eval task files call: their documents and their scoring.

The documents come from tora's own data loaders (`tora.data.load_problems`),
so the question text and the reference answer are exactly those `tora eval`
uses, read from wherever tora finds its data sets ($TORA_DATA_DIR, ...).
A response is scored the way `tora eval` scores a trajectory: tora's answer
extraction (the last \\boxed{} outside code, ...) and the Math-Verify grader.
"""

from __future__ import annotations

from typing import Any

from tora.data import load_problems
from tora.grading import DEFAULT_GRADER, grade, predict


def documents(name: str) -> dict[str, Any]:
    """A data set as lm-eval's custom_dataset wants it: {"test": datasets.Dataset}."""
    import datasets

    rows = [{"id": p.id, "question": p.text, "answer": p.answer or "", "type": str(p.meta.get("type", "")),
             "level": str(p.meta.get("level", ""))} for p in load_problems(name)]
    return {"test": datasets.Dataset.from_list(rows)}


def gsm8k(**_: Any) -> dict[str, Any]:
    return documents("gsm8k")


def math500(**_: Any) -> dict[str, Any]:
    return documents("math500")


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """acc: the response's extracted answer equals the reference under Math-Verify."""
    prediction = predict(results[0], DEFAULT_GRADER)
    verdict = grade(prediction.answer, doc["answer"], DEFAULT_GRADER)
    return {"acc": 1.0 if verdict.correct else 0.0}
