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


def test_each_embedded_model_names_its_prompt_and_other_specs_get_toras_few_shot() -> None:
    from tora.prompts import default_prompt

    assert default_prompt("embedded") == default_prompt("embedded", "svamp") == "tora-gsm8k"  # measured best
    assert default_prompt("embedded", "aime24") == "tora-math"
    assert default_prompt("embedded-tiny") == "tora-gsm8k"  # a base model: ToRA's few-shot, by data set
    assert default_prompt("embedded-tiny", "olympiadbench") == default_prompt("replay:x", "math500") == "tora-math"
    assert default_prompt("gguf:/m.gguf", "gsm8k") == "tora-gsm8k"


def test_the_tir_prompt_is_qwen25_maths_system_prompt() -> None:
    tir = load_prompt("tir")
    assert tir.kind == "chat" and tir.prefix == ""
    assert tir.messages("What is 17 * 23?") == [
        {"role": "system", "content": "Please integrate natural language reasoning with programs to solve the problem "
                                      "above, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 17 * 23?"},
    ]


def test_embedded_specs_take_no_argument() -> None:
    from tora.backends.registry import load_backend
    from tora.errors import ModelSpecError

    for spec in ("embedded:x", "embedded-tiny:x"):
        with pytest.raises(ModelSpecError, match=f"the spec '{spec.split(':')[0]}' takes no argument"):
            load_backend(spec)
