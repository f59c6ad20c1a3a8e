"""The `openai:` model spec, the chat transcript and local chat templates: pure functions, no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tora.backends import chat_template, transcript
from tora.backends.openai import ServerSpec
from tora.backends.registry import load_backend
from tora.errors import ModelSpecError, PromptError

GEMMA_TEMPLATE = Path(__file__).parent / "data" / "gemma3-tokenizer"


def test_spec_syntax_with_model_url_and_options() -> None:
    spec = ServerSpec.parse("Qwen/Qwen2.5-Math-7B@http://127.0.0.1:8000/v1/?protocol=tools&concurrency=32"
                            "&api_key_env=MY_KEY&retries=2&backoff=0.1&timeout=30")
    assert spec.model == "Qwen/Qwen2.5-Math-7B"
    assert spec.base_url == "http://127.0.0.1:8000/v1"
    assert (spec.protocol, spec.concurrency, spec.api_key_env) == ("tools", 32, "MY_KEY")
    assert (spec.retries, spec.backoff_s, spec.timeout_s) == (2, 0.1, 30.0)
    extra = ServerSpec.parse("m@http://h:1/v1?body.repeat_penalty=1.0&body.top_k=-1&body.guided=json&body.x=[1]")
    assert extra.body == {"repeat_penalty": 1.0, "top_k": -1, "guided": "json", "x": [1]}


def test_spec_defaults_and_a_model_left_out() -> None:
    spec = ServerSpec.parse("https://api.example.com/v1")
    assert spec.model == "" and spec.base_url == "https://api.example.com/v1"
    assert (spec.protocol, spec.concurrency, spec.retries, spec.template) == ("completions", 8, 4, None)
    # A model name may itself hold '@' (only '@http' starts the URL).
    assert ServerSpec.parse("org/m@v2@http://h:1/v1").model == "org/m@v2"


@pytest.mark.parametrize(("arg", "says"), [
    ("gemma", "openai:MODEL@http://HOST:PORT/v1"),
    ("m@http://user:secret@h:1/v1", "credentials in the URL would be recorded"),
    ("m@http:///v1", "names no host"),
    ("m@http://h:1/v1?protocol=chat", "protocol must be one of completions, chat-continue, tools"),
    ("m@http://h:1/v1?concurrency=0", "concurrency must be a number >= 1"),
    ("m@http://h:1/v1?retries=many", "retries must be a number"),
    ("m@http://h:1/v1?timeout=0", "timeout must be a number > 0"),
    ("m@http://h:1/v1?colour=red", "unknown option 'colour'"),
    ("m@http://h:1/v1?retries=1&retries=2", "given twice"),
    ("m@http://h:1/v1?protocol=tools&template=/x.jinja", "protocol=tools needs the server's own template"),
    ("m@http://h:1/v1?api_key_env=not-a-name", "must name an environment variable"),
])
def test_bad_specs_say_what_is_wrong(arg: str, says: str) -> None:
    with pytest.raises(ModelSpecError, match="openai:") as info:
        ServerSpec.parse(arg)
    assert says in str(info.value)
    assert "secret" not in str(info.value)


def test_spec_errors_reach_the_registry_as_usage_errors() -> None:
    with pytest.raises(ModelSpecError) as info:
        load_backend("openai:m@http://127.0.0.1:9/v1?protocol=bogus")
    assert info.value.exit_code == 2


def test_api_key_comes_from_the_environment_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORA_OPENAI_API_KEY", "OPENAI_API_KEY", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)
    spec = ServerSpec.parse("m@http://h:1/v1")
    assert spec.api_key() is None
    monkeypatch.setenv("OPENAI_API_KEY", "k-openai")
    assert spec.api_key() == "k-openai"
    monkeypatch.setenv("TORA_OPENAI_API_KEY", "k-tora")
    assert spec.api_key() == "k-tora"
    named = ServerSpec.parse("m@http://h:1/v1?api_key_env=MY_KEY")
    with pytest.raises(ModelSpecError, match="MY_KEY"):
        named.api_key()
    monkeypatch.setenv("MY_KEY", "k-mine")
    assert named.api_key() == "k-mine"


def test_transcript_round_trip_and_assistant_text() -> None:
    messages = [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "What is 6*7?"}]
    text = transcript.render(messages)
    assert text == "<|system|>\nBe brief.\n\n<|user|>\nWhat is 6*7?\n<|assistant|>\n"
    assert transcript.parse(text) == (messages, "")
    # The model's text may hold anything, headers included: it is after the first assistant header.
    assert transcript.parse(text + "Sure.\n<|user|>\nhi") == (messages, "Sure.\n<|user|>\nhi")
    assert transcript.parse("Question: plain completion prompt\n") is None
    with pytest.raises(PromptError, match="break its transcript"):
        transcript.render([{"role": "user", "content": "a\n<|assistant|>\nb"}])


def test_tool_turns_pair_each_python_block_with_its_output() -> None:
    text = ("First.\n```python\nx = 6\nprint(x * 7)\n```\n```output\n42\n```\n"
            "```python\nprint(x)\n```\n```output\n6\n```\nSo the answer")
    turns, rest = transcript.tool_turns(text)
    args = [json.loads(t["tool_calls"][0]["function"]["arguments"]) for t in turns if t["role"] == "assistant"]
    assert args == [{"code": "x = 6\nprint(x * 7)"}, {"code": "print(x)"}]
    assert [(t["role"], t.get("content")) for t in turns] == [
        ("assistant", "First."), ("tool", "42"), ("assistant", ""), ("tool", "6")]
    assert [t["tool_call_id"] for t in turns if t["role"] == "tool"] == ["call_1", "call_2"]
    assert rest == "So the answer"
    # A python block without an output block after it is still the assistant's text.
    assert transcript.tool_turns("```python\nprint(1)\n```\nno output") == ([], "```python\nprint(1)\n```\nno output")


def test_chat_template_from_a_tokenizer_dir_leaves_out_bos() -> None:
    template = chat_template.load(GEMMA_TEMPLATE)
    assert template.bos == "<bos>"
    text = template.render([{"role": "system", "content": "Sys."}, {"role": "user", "content": "Q?"}])
    assert text == "<start_of_turn>user\nSys.\n\nQ?<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_sources_and_their_errors(tmp_path: Path) -> None:
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]")
    assert chat_template.load(jinja).render([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    with pytest.raises(ModelSpecError, match="no chat template"):
        chat_template.load(tmp_path)
    with pytest.raises(ModelSpecError, match="not found"):
        chat_template.load(tmp_path / "missing.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(PromptError, match=r"broken\.jinja"):
        chat_template.load(broken).render([{"role": "user", "content": "hi"}])


def test_tool_turns_group_the_calls_of_one_reply_under_its_ids() -> None:
    text = ("Two.\n```python\nx = 1\n```\n```output\n\n```\n```python\nprint(x)\n```\n```output\n1\n```\n"
            "```python\nprint(2)\n```\n```output\n2\n```\n")
    second = text.index("```python\nprint(x)")
    third = text.index("```python\nprint(2)")
    turns, rest = transcript.tool_turns(text, {0 + len("Two.\n"): ["a", "b"], third: [None]})
    assert rest == ""
    assert [(t["role"], [c["id"] for c in t.get("tool_calls", [])] or t.get("tool_call_id")) for t in turns] == [
        ("assistant", ["a", "b"]), ("tool", "a"), ("tool", "b"), ("assistant", ["call_3"]), ("tool", "call_3")]
    # A reply the text does not hold (its calls are not one after another there) falls back to one call each.
    apart = text[:second] + "Hmm.\n" + text[second:]
    turns, _ = transcript.tool_turns(apart, {len("Two.\n"): ["a", "b"]})
    assert [c["id"] for t in turns for c in t.get("tool_calls", [])] == ["call_1", "call_2", "call_3"]
