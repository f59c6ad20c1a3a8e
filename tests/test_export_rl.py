"""`tora export --format rl`: token-level rollouts with an exact loss mask.

Records here get their ids from a character tokenizer (one id per character,
`retokenize`), so every token has a known place in the completion and the
mask can be checked against the output blocks' character spans, which are
computed independently (`tora.export.view.output_spans`). The same checks on
a real model's record, with llama.cpp's own ids, are in test_tokens.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TORA, tora_in_process
from trajectory_fixtures import corpus

from tora.errors import UsageError
from tora.export.formats import trl_row
from tora.export.rl import RewardRule, RLRow, retokenize, rl_row
from tora.export.view import output_spans
from tora.record import ExecutionStep, TextStep, Trajectory, TrajectoryWriter
from tora.render import observation

BOS = 1


class Chars:
    """One id per character (its code point); BOS is 1."""

    bos_token = "\x01"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]


def tokened(t: Trajectory, logprob: float | None = -0.5) -> Trajectory:
    """`t` as the token path records it: ids on every step, logprobs on the model's."""
    t = retokenize(t, Chars())
    for step in t.steps:
        if isinstance(step, TextStep) and logprob is not None:
            step.logprobs = [logprob] * len(step.token_ids or [])
    t.generation.token_path = "tokens"
    return t


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def write(path: Path, records: list[Trajectory]) -> Path:
    with TrajectoryWriter(path) as w:
        for t in records:
            w.append_sync(t)
    return path


@pytest.mark.parametrize("index", range(4))
def test_the_mask_is_zero_on_exactly_the_output_blocks(index: int) -> None:
    t = tokened(corpus()[index])
    row = rl_row(t)
    assert row is not None and t.prompt_ids is not None
    assert row.prompt_ids == [BOS, *map(ord, t.prompt)]
    assert decode(row.response_ids) == t.completion()
    tool = {i for start, end in output_spans(t) for i in range(start, end)}
    assert tool, "a record without output blocks proves nothing here"
    assert row.response_mask == [0 if i in tool else 1 for i in range(len(row.response_ids))]
    assert row.response_logprobs == [0.0 if i in tool else -0.5 for i in range(len(row.response_ids))]
    steps = [s for s in t.steps if isinstance(s, TextStep | ExecutionStep)]
    assert row.num_turns == 1 + len(steps)


def test_the_token_paths_output_line_is_the_models_and_the_rest_of_the_block_the_tools() -> None:
    # On the token path the model's own "```output" token stays in its text (mask 1);
    # the observation is the rest of the block (mask 0), and the chat formats do not show the line.
    t = corpus()[0]
    first, ex = t.steps[0], t.steps[2]
    assert isinstance(first, TextStep) and isinstance(ex, ExecutionStep)
    first.content += "```output\n"
    ex.observation = observation(ex.rendered, first.content, opened=True)
    t = tokened(t)
    row = rl_row(t)
    assert row is not None
    cut = len(first.content)
    assert decode(row.response_ids[:cut]).endswith("```\n```output\n") and set(row.response_mask[:cut]) == {1}
    assert decode(row.response_ids[cut : cut + len(ex.observation)]) == "2\n```\n"
    assert set(row.response_mask[cut : cut + len(ex.observation)]) == {0}
    assistant = trl_row(t)["messages"][1]
    assert "```output" not in assistant["content"] and assistant["tool_calls"]


def test_a_record_without_tokens_gives_no_row_and_absent_logprobs_stay_absent() -> None:
    t = corpus()[0]
    assert rl_row(t) is None  # text path: never re-tokenised behind the caller's back
    row = rl_row(tokened(t, logprob=None))
    assert row is not None and row.response_logprobs is None


def test_the_reward_rule() -> None:
    right, wrong, unrun = corpus()[0], corpus()[1], corpus()[0]
    unrun.result.correct = None
    assert RewardRule().reward(right) == 1.0 and RewardRule().reward(wrong) == 0.0
    assert RewardRule().reward(unrun) is None  # not graded: no reward, not a zero
    rule = RewardRule.parse("wrong=-1,tool_error=-0.25,no_answer=-0.5,truncated=-2")
    assert rule.reward(wrong) == -1.25  # one failed cell
    wrong.result.final_answer, wrong.result.finish = None, "max_tokens"
    assert rule.reward(wrong) == -1 - 0.25 - 0.5 - 2
    for bad in ("correct", "bonus=1", "wrong=x"):
        with pytest.raises(UsageError, match="--reward"):
            RewardRule.parse(bad)


def test_export_rl_writes_rows_says_what_it_left_out_and_round_trips_through_datasets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = pytest.importorskip("datasets")
    graded, ungraded, text_only = tokened(corpus()[0]), tokened(corpus()[1]), corpus()[3]
    ungraded.result.correct = None
    src = write(tmp_path / "t.jsonl", [graded, ungraded, text_only])
    code, out, err = tora_in_process(["export", str(src), "-f", "rl", "--reward", "no_answer=-0.5"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 1 and RLRow.model_validate(rows[0]) == rl_row(graded, RewardRule(no_answer=-0.5))
    assert rows[0]["reward"] == 1.0 and rows[0]["meta"]["reward_rule"]["no_answer"] == -0.5
    assert rows[0]["meta"]["tokens"] == "recorded"
    assert "1 records without tokens left out" in err and "1 ungraded records left out" in err
    # Through the parquet path, and back through datasets unchanged.
    pq = tmp_path / "rl.parquet"
    code, _, err = tora_in_process(["export", str(src), "-f", "parquet", "--rows", "rl", "--out", str(pq)], capsys)
    assert code == 0, err
    loaded = datasets.load_dataset("parquet", data_files=str(pq), split="train").to_list()
    assert len(loaded) == 1
    for key in ("prompt_ids", "response_ids", "response_mask", "response_logprobs", "reward", "num_turns"):
        assert loaded[0][key] == rows[0][key], key
    assert datasets.Dataset.from_list(rows).to_list() == rows
    code, _, err = tora_in_process(["export", str(src), "-f", "rl", "--reward", "bonus=2"], capsys)
    assert code == 2 and "--reward 'bonus=2'" in err


def test_retokenize_is_opt_in_and_marked(tmp_path: Path) -> None:
    for module in ("transformers", "tokenizers"):
        pytest.importorskip(module)
    tok = tmp_path / "tok"
    # Its own process: transformers must not meet llama.cpp in this one (see tiny_hf.py).
    subprocess.run([sys.executable, str(Path(__file__).with_name("tiny_hf.py")), "tokenizer", str(tok)],
                   check=True, timeout=300)
    src = write(tmp_path / "t.jsonl", [corpus()[0]])
    proc = subprocess.run([*TORA, "export", str(src), "-f", "rl", "--retokenize", str(tok)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    meta: dict[str, Any] = row["meta"]
    assert meta["tokens"] == "retokenized" and meta["retokenized_with"] == "tok"
    assert row["response_logprobs"] is None and 0 in row["response_mask"] and 1 in row["response_mask"]
