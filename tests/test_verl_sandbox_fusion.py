"""verl's own SandboxFusion client against `tora sandbox serve`, unchanged.

verl scores code with `verl.utils.reward_score.sandbox_fusion.check_correctness`:
one POST /run_code per test case (the program, the case's stdin, a run timeout)
to a SandboxFusion URL, then its own reading of the answer (`status`,
`run_result.status`, `return_code`, `stdout`). Pointed at tora's service, each
case runs in a fresh sandboxed kernel. verl is not in .venv (its pins fight
tora's); this runs in .venv-verl:

    ./setup.sh --dev --verl && .venv-verl/bin/python -m pytest -q -m verl tests/test_verl_sandbox_fusion.py
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tora.serve.process import SandboxServeProcess

pytestmark = [pytest.mark.verl]

CASES = {"inputs": ["1 2\n", "5 7\n", "10 -4\n"], "outputs": ["3\n", "12\n", "6\n"]}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    pytest.importorskip("verl")
    with SandboxServeProcess(["--timeout", "10", "--concurrency", "4"]) as server:
        yield f"{server.url}/run_code"
        assert server.stop() == 0


def test_verl_scores_right_and_wrong_programs_through_tora(url: str) -> None:
    from verl.utils.reward_score.sandbox_fusion.utils import check_correctness

    right = "a, b = map(int, input().split())\nprint(a + b)"
    results, meta = check_correctness(url, CASES, right, timeout=10)
    assert results == [True, True, True], meta
    wrong = "a, b = map(int, input().split())\nprint(a - b)"
    results, meta = check_correctness(url, CASES, wrong, timeout=10)
    assert results == [False, False, False], meta
    assert [m["status"] for m in meta] == ["wrong_answer"] * 3


def test_verl_reads_tora_errors_and_timeouts_as_it_reads_sandboxfusion(url: str) -> None:
    from verl.utils.reward_score.sandbox_fusion.utils import check_correctness

    one = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    # verl: -2 a runtime error (a non-zero exit), -3 a time limit exceeded.
    results, meta = check_correctness(url, one, "raise SystemExit(3)", timeout=10)
    assert results == [-2] and meta[0]["status"] == "runtime_error", meta
    results, meta = check_correctness(url, one, "1 / 0", timeout=10)
    assert results == [-2] and "ZeroDivisionError" in (meta[0]["stderr"] or ""), meta
    results, meta = check_correctness(url, one, "while True:\n    pass", timeout=2)
    assert results == [-3] and meta[0]["status"] == "timeout", meta
