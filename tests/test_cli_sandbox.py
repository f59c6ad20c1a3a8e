"""`tora sandbox check` and `tora sandbox exec`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tora.cli.sandbox import sandbox
from tora.kernels import sandbox_policy

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


def test_check_and_exec_report_the_policy_trajectories_get(tmp_path: Path) -> None:
    """TORA_ISOLATION and TORA_SANDBOX_* reach the diagnostic as they reach trajectories
    (one function builds the policy: tora.kernels.sandbox_policy); a flag still wins."""
    limits = {"TORA_SANDBOX_MAX_PROCS": "37", "TORA_MEMORY_MB": "777"}
    result = CliRunner().invoke(sandbox, ["check", "--json"], env=limits)
    assert result.exit_code == 0, result.output
    details = " ".join(p["detail"] for p in json.loads(result.output)["protections"])
    assert "777 MB" in details and ("max 37" in details or "RLIMIT_NPROC 37" in details), details
    env = {**limits, "TORA_ISOLATION": "none"}
    result = CliRunner().invoke(sandbox, ["check", "--json"], env=env)
    assert result.exit_code == 0 and json.loads(result.output)["tier"] == "none", result.output
    flag = CliRunner().invoke(sandbox, ["check", "--json", "--isolation", "landlock"], env=env)
    assert flag.exit_code == 0 and json.loads(flag.output)["tier"] in ("landlock", "none"), flag.output
    from tora.loop import LoopSettings

    assert LoopSettings.build().policy == sandbox_policy(timeout_s=10.0)  # what eval/curate/serve get
    f = tmp_path / "one.py"
    f.write_text("print(1)")
    ran = CliRunner().invoke(sandbox, ["exec", str(f), "--json"], env=env)
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output)["kernel"]["tier"] == "none"
    bad = CliRunner().invoke(sandbox, ["check"], env={"TORA_SANDBOX_NO_SUCH": "1"})
    assert bad.exit_code != 0 and "no sandbox limit is called 'no_such'" in str(bad.exception)


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


def test_exec_parallel_runs_each_file_in_its_own_fresh_kernel_at_once(tmp_path: Path) -> None:
    files = []
    for name in ("a", "b", "c"):
        f = tmp_path / f"{name}.py"
        f.write_text(
            f"import time\nstart = time.time()\n{name} = 1\ntime.sleep(1)\nprint(start, time.time(), sorted(k for k in 'abc' if k in globals()))"
        )
        files.append(str(f))
    result = CliRunner().invoke(sandbox, ["exec", "--parallel", "--json", *files])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["parallel"] is True
    cells = out["cells"]
    assert [c["file"] for c in cells] == files and all(c["status"] == "ok" for c in cells)
    spans = [c["stdout"].split(" ", 2) for c in cells]
    # Each kernel saw only its own file's variable: nothing carried over.
    assert [s[2].strip() for s in spans] == ["['a']", "['b']", "['c']"]
    # All at once: every cell started before any ended.
    assert max(float(s[0]) for s in spans) < min(float(s[1]) for s in spans)
    assert len({c["kernel"]["pid"] for c in cells}) == 3


def test_exec_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "ok.py"
    good.write_text("print(1)")
    binary = tmp_path / "bin.py"
    binary.write_bytes(b"\xff\xfe\x00")
    for args, words in (
        ([str(tmp_path)], "is a directory"),
        ([str(binary)], "cannot read"),
        (["--timeout", "-1", str(good)], "--timeout"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tora.cli.main", "sandbox", "exec", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().count("\n") == 0 and words in proc.stderr, proc.stderr
        assert proc.stdout == ""


# A cell that sends, signed as its own output, text holding lone surrogates
# (a JSON "\ud800" escape): what every output path must survive.
SURROGATE_CELL = r"""
import json
_k = get_ipython().kernel
for kind, content in [('stream', {'name': 'stdout', 'text': 'a\ud800b\n'}),
                      ('stream', {'name': 'stderr', 'text': 'e\udfff\n'})]:
    parts = [_k.session.pack(_k.session.msg_header(kind)), _k.session.pack(_k.get_parent()['header']), b'{}',
             json.dumps(content).encode()]
    _k.iopub_socket.send_multipart([b'stream', b'<IDS|MSG>', _k.session.sign(parts), *parts])
print('done')
"""


def test_exec_survives_lone_surrogates_on_the_terminal_and_in_json(tmp_path: Path) -> None:
    cell = tmp_path / "odd.py"
    cell.write_text(SURROGATE_CELL)
    for extra in ([], ["--json"]):
        # A pipe: Python's strict UTF-8 encoder, where the surrogate used to kill the command.
        proc = subprocess.run(
            [sys.executable, "-m", "tora.cli.main", "sandbox", "exec", str(cell), *extra],
            capture_output=True,
            cwd=ROOT,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        text = proc.stdout.decode("utf-8")  # strict: valid UTF-8 throughout
        if extra:
            (result,) = json.loads(text)["cells"]
            assert result["stdout"].startswith("a\ufffdb\n") and result["stderr"].startswith("e\ufffd"), result
            assert result["status"] == "ok" and result["stdout"].endswith("done\n"), result
        else:
            assert "a\ufffdb" in text and "e\ufffd" in text, text
