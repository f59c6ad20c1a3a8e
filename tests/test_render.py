from sandbox import CellError, CellResult
from tora.render import observation, render_default, render_tora_compat


def test_tora_compat_stdout_else_last_traceback_line_and_truncation() -> None:
    ok = CellResult(status="ok", stdout="x" * 1000 + "\n", duration_s=0.1)
    assert render_tora_compat(ok) == "x" * 200 + "..." + "x" * 200
    err = CellResult(status="error", stdout="", duration_s=0.1,
                     error=CellError(ename="NameError", evalue="name 'y' is not defined", traceback=["..."]))
    assert render_tora_compat(err) == "NameError: name 'y' is not defined"
    assert render_tora_compat(CellResult(status="ok", duration_s=0.0)) == ""


def test_default_keeps_partial_output_before_an_error_and_marks_cuts() -> None:
    err = CellResult(status="error", stdout="step 1\n", duration_s=0.1,
                     error=CellError(ename="ZeroDivisionError", evalue="division by zero"))
    assert render_default(err) == "step 1\nZeroDivisionError: division by zero"
    big = render_default(CellResult(status="ok", stdout="y" * 5000, duration_s=0.1))
    assert "characters cut" in big and len(big) < 2100
    timeout = render_default(CellResult(status="timeout", duration_s=2.0), 2.0)
    assert timeout.startswith("TimeoutError") and "2 s" in timeout


def test_observation_starts_on_its_own_line() -> None:
    assert observation("4", "```\n") == "```output\n4\n```\n"
    assert observation("4", "```") == "\n```output\n4\n```\n"
