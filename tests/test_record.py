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
