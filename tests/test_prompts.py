import hashlib
from pathlib import Path

import pytest

from tora.errors import PromptError
from tora.prompts import available, load_prompt


def test_shipped_templates_load_with_sha_and_placeholder() -> None:
    assert {"tora-gsm8k", "tora-math", "tora-train", "chat"} <= set(available())
    t = load_prompt("tora-gsm8k")
    path = Path(__file__).resolve().parent.parent / "prompts" / "tora-gsm8k.md"
    assert t.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    filled = t.fill("What is 2+2?")
    assert filled.endswith("Question: What is 2+2?\n\nSolution:\n")
    assert filled.startswith(t.prefix) and "\\boxed{}" in t.prefix
    train = load_prompt("tora-train")
    assert train.fill("Q") == "<|user|>\nQ\n<|assistant|>\n"
    chat = load_prompt("chat")
    assert chat.kind == "chat" and chat.messages("Q")[1] == {"role": "user", "content": "Q"}


def test_bad_templates_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="unknown prompt 'nope'"):
        load_prompt("nope")
    bad = tmp_path / "bad.md"
    bad.write_text("+++\nkind = 'completion'\n+++\nno placeholder here\n")
    with pytest.raises(PromptError, match="placeholder"):
        load_prompt(str(bad))
    worse = tmp_path / "worse.md"
    worse.write_text("+++\nkind = \n+++\n{question}")
    with pytest.raises(PromptError, match="not valid TOML"):
        load_prompt(str(worse))
