"""The transformers backend on a real (tiny, randomly initialised) Llama model
saved to disk: real tokenizer files, real `generate`, real streaming. Runs in
subprocesses (see tiny_hf.py for why)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TORA

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("the hf extra (torch, transformers) is not installed", allow_module_level=True)

SCRIPT = [sys.executable, str(Path(__file__).with_name("tiny_hf.py"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([*SCRIPT, "build", str(out)], check=True, timeout=300)
    return out


def check(model_dir: Path, stop: str | None = None) -> dict:  # type: ignore[type-arg]
    args = [*SCRIPT, "check", str(model_dir)] + ([stop] if stop else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_streams_respects_budget_and_stop_strings(model_dir: Path) -> None:
    free = check(model_dir)
    assert free["name"] == "transformers" and free["chat"] == "<user>hi\n<assistant>"
    done = free["done"]
    assert done["finish_reason"] in ("length", "eos") and done["completion_tokens"] <= 40 and done["prompt_tokens"] > 5
    text = free["text"]
    if len(text) < 12:
        pytest.skip("the random model ended too early to pick a stop string")
    stop = text[6:9]
    cut = check(model_dir, stop)
    assert cut["done"]["finish_reason"] == "stop" and cut["done"]["stop_string"] == stop
    assert cut["text"] == text[: text.index(stop)]


def test_solve_records_a_trajectory_from_an_hf_model(model_dir: Path) -> None:
    proc = subprocess.run([*TORA, "solve", "--json", "--max-tokens", "30", "--model", f"hf:{model_dir}", "1+1?"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode in (0, 3), proc.stderr
    t = json.loads(proc.stdout)
    assert t["generation"]["backend"] == "transformers" and t["stats"]["completion_tokens"] > 0
    # The chat path: the model's own chat template renders system + user messages.
    proc = subprocess.run([*TORA, "solve", "--json", "--prompt", "chat", "--max-tokens", "10", "--model",
                           f"hf:{model_dir}", "1+1?"], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode in (0, 3), proc.stderr
    chat = json.loads(proc.stdout)
    assert chat["prompt"].startswith("<system>Integrate step-by-step reasoning") and chat["prompt"].endswith("<user>1+1?\n<assistant>")
    assert chat["generation"]["prompt_template"]["name"] == "chat"


def test_records_exactly_the_sequence_the_model_read(model_dir: Path) -> None:
    # The checks run in the subprocess (tests/token_checks.py); it prints what it saw.
    proc = subprocess.run([*SCRIPT, "tokens", str(model_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["token_path"] == "tokens" and seen["tokenizer"] and seen["model_id"]
    assert seen["around_block"] and seen["block_text"] == "```output\n42\n```\n"
