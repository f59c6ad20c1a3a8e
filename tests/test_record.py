import json
from pathlib import Path

import pytest

from tora.errors import DataError
from tora.record import (
    Generation,
    Problem,
    PromptRef,
    Result,
    Runtime,
    Sampling,
    TextStep,
    Trajectory,
    TrajectoryWriter,
    read_trajectories,
)
from tora.record.schema import CodeStep, ExecutionStep


def make(i: int = 0) -> Trajectory:
    return Trajectory(
        problem=Problem(id=f"p{i}", text="What is 1+1?", answer="2"),
        sample_index=i,
        generation=Generation(backend="replay", model="m", spec="replay:x",
                              prompt_template=PromptRef(name="t", sha256="0" * 64), sampling=Sampling(),
                              max_tool_calls=4),
        runtime=Runtime(),
        prompt="Q: What is 1+1?\n",
        steps=[TextStep(content="```python\nprint(1+1)\n```\n"), CodeStep(content="print(1+1)\n"),
               ExecutionStep(status="ok", stdout="2\n", rendered="2", observation="```output\n2\n```\n"),
               TextStep(content="$\\boxed{2}$")],
        result=Result(final_answer="2", finish="answered"),
    )


def test_context_round_trips_byte_for_byte() -> None:
    t = make()
    assert t.context() == "Q: What is 1+1?\n```python\nprint(1+1)\n```\n```output\n2\n```\n$\\boxed{2}$"
    again = Trajectory.model_validate_json(t.model_dump_json())
    assert again == t and again.context() == t.context()


def test_writer_appends_and_heals_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryWriter(path) as w:
        w.append_sync(make(0))
    with path.open("a") as f:
        f.write('{"id": "torn", "schema_ver')  # a crash mid-write
    with TrajectoryWriter(path) as w:
        w.append_sync(make(1))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith('{"id": "torn"')
    assert [t.sample_index for t in read_trajectories(path, skip_invalid=True)] == [0, 1]
    with pytest.raises(DataError, match=r"t\.jsonl:2: not valid JSON"):
        list(read_trajectories(path))


def test_bad_field_error_names_file_line_and_field(tmp_path: Path) -> None:
    raw = json.loads(make().model_dump_json())
    raw["result"]["finish"] = "maybe"
    path = tmp_path / "bad.jsonl"
    path.write_text(make().model_dump_json() + "\n" + json.dumps(raw) + "\n")
    with pytest.raises(DataError) as err:
        list(read_trajectories(path))
    assert str(err.value).startswith(f"{path}:2: field 'result.finish':")


def test_unknown_major_version_rejected_unknown_fields_ignored(tmp_path: Path) -> None:
    raw = json.loads(make().model_dump_json())
    raw["new_field"] = 1
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(raw) + "\n")
    assert len(list(read_trajectories(ok))) == 1
    raw["schema_version"] = "2.0"
    bad = tmp_path / "v2.jsonl"
    bad.write_text(json.dumps(raw) + "\n")
    with pytest.raises(DataError, match="schema_version"):
        list(read_trajectories(bad))


def test_1_0_and_1_1_records_read_with_the_1_2_fields_null(tmp_path: Path) -> None:
    raw = json.loads(make().model_dump_json())
    for key in ("prompt_ids",):
        raw.pop(key)
    for key in ("token_path", "tokenizer", "model_id"):
        raw["generation"].pop(key)
    for step in raw["steps"]:
        for key in ("token_ids", "logprobs", "stop", "observation_ids"):
            step.pop(key, None)
    old_11 = dict(raw, schema_version="1.1")
    old_10 = json.loads(json.dumps(dict(raw, schema_version="1.0")))
    old_10["result"]["error"] = "ValueError: boom"  # 1.0 held the error as a string
    old_10["generation"].pop("run_on")
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(old_10) + "\n" + json.dumps(old_11) + "\n")
    t10, t11 = read_trajectories(path)
    for t in (t10, t11):
        assert t.prompt_ids is None and t.generation.token_path == "text" and t.generation.tokenizer is None
        assert t.token_sequence() is None
        text = t.steps[0]
        assert isinstance(text, TextStep) and text.token_ids is None and text.logprobs is None and text.stop is None
    assert t10.result.error is not None and t10.result.error.kind == "internal"
    assert t11.context() == make().context()


def test_token_fields_round_trip_and_make_the_sequence() -> None:
    from tora.record import ModelId, Stop, TokenizerId

    t = make()
    t.prompt_ids = [2, 10, 11]
    steps = t.steps
    assert isinstance(steps[0], TextStep) and isinstance(steps[2], ExecutionStep) and isinstance(steps[3], TextStep)
    steps[0].token_ids, steps[0].logprobs = [20, 21], [-0.5, -0.25]
    steps[0].stop = Stop(kind="stop_string", string="```output")
    steps[2].observation_ids = [30, 31, 32]
    steps[3].token_ids, steps[3].stop = [40, 1], Stop(kind="eos")
    t.generation.token_path = "tokens"
    t.generation.tokenizer = TokenizerId(name="tok", vocab_sha256="a" * 64)
    t.generation.model_id = ModelId(kind="gguf", sha256="b" * 64, files=["m.gguf"])
    again = Trajectory.model_validate_json(t.model_dump_json())
    assert again == t and again.schema_version == "1.3"
    assert again.token_sequence() == [2, 10, 11, 20, 21, 30, 31, 32, 40, 1]
    steps[2].observation_ids = None  # one segment absent: no sequence, never a partial one
    assert t.token_sequence() is None


def test_the_published_json_schema_matches_the_model() -> None:
    from tora.record.schema import SCHEMA_FILE, json_schema_text

    # Regenerate with `python -m tora.record.schema` after changing the model.
    assert SCHEMA_FILE.read_text() == json_schema_text()
    schema = json.loads(SCHEMA_FILE.read_text())
    assert "prompt_ids" in schema["properties"] and "token_ids" in schema["$defs"]["TextStep"]["properties"]


def test_records_validate_against_the_published_json_schema() -> None:
    import jsonschema  # the dev extra installs it

    from tora.record.schema import SCHEMA_FILE

    schema = json.loads(SCHEMA_FILE.read_text())
    t = make()
    t.prompt_ids = [2, 3]
    step = t.steps[0]
    assert isinstance(step, TextStep)
    step.token_ids, step.logprobs = [4, 5], [-0.1, -0.2]
    jsonschema.validate(json.loads(t.model_dump_json()), schema)
    bad = json.loads(t.model_dump_json())
    bad["steps"][0]["token_ids"] = ["four"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
