"""`tora sandbox check` and `tora sandbox exec`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tora.cli.sandbox import sandbox

ROOT = Path(__file__).resolve().parents[1]


def test_check_json_lists_protections() -> None:
    result = CliRunner().invoke(sandbox, ["check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tier"] in ("bwrap", "landlock", "none")
    assert {p["name"] for p in report["protections"]} >= {"filesystem", "network", "memory"}


def test_check_human_names_the_tier_and_flags_no_isolation() -> None:
    result = CliRunner().invoke(sandbox, ["check", "--isolation", "none"])
    assert result.exit_code == 0
    assert "tier none" in result.output and "NOT ISOLATED" in result.output


def test_exec_runs_files_in_order_in_one_kernel(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    b = tmp_path / "b.py"
    c = tmp_path / "c.py"
    a.write_text("x = 20\nprint('a')")
    b.write_text("print(x + 1)\n1/0")
    c.write_text("import time\ntime.sleep(30)")
    result = CliRunner().invoke(sandbox, ["exec", str(a), str(b), str(c), "--timeout", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    cells = out["cells"]
    assert [cell["status"] for cell in cells] == ["ok", "error", "timeout"]
    assert cells[0]["stdout"] == "a\n"
    assert cells[1]["stdout"] == "21\n" and cells[1]["error"]["ename"] == "ZeroDivisionError"
    assert cells[2]["file"] == str(c)
    assert out["kernel"]["tier"] in ("bwrap", "landlock", "none")


def test_exec_human_output_shows_status_and_error(tmp_path: Path) -> None:
    f = tmp_path / "boom.py"
    f.write_text("raise ValueError('bad value')")
    result = CliRunner().invoke(sandbox, ["exec", str(f)])
    assert result.exit_code == 0
    assert "error" in result.output and "ValueError: bad value" in result.output


def test_exec_missing_file_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tora.cli.main", "sandbox", "exec", str(tmp_path / "missing.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.py" in proc.stderr
    assert proc.stdout == ""


def test_exec_requires_a_file() -> None:
    result = CliRunner().invoke(sandbox, ["exec"])
    assert result.exit_code == 2
