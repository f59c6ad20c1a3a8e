"""Interpreters under /tmp (a CI checkout, say) stay visible in the sandbox,
whose private /tmp would otherwise hide them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import bwrap


def test_roots_under_tmp_are_mapped_and_the_interpreter_path_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bwrap, "python_roots", lambda python: ["/opt/py311", "/tmp/ci/clone/.venv"])
    assert bwrap.python_mounts("x") == [("/opt/py311", "/opt/py311"), ("/tmp/ci/clone/.venv", "/sandbox/py1")]
    assert bwrap.sandbox_python("/tmp/ci/clone/.venv/bin/python") == "/sandbox/py1/bin/python"
    assert bwrap.sandbox_python("/opt/py311/bin/python3") == "/opt/py311/bin/python3"


def test_the_bwrap_command_binds_mapped_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox import SandboxPolicy

    monkeypatch.setattr(bwrap, "python_roots", lambda python: ["/tmp/ci/.venv"])
    ro, stage = bwrap.staged(bwrap.read_only_binds("/tmp/ci/.venv/bin/python"), None)
    assert stage == []
    argv = bwrap.bwrap_argv(SandboxPolicy(), ro, [], {}, single=True, disable_userns=True)
    i = argv.index("/tmp/ci/.venv")
    assert argv[i - 1] == "--ro-bind" and argv[i + 1] == "/sandbox/py0"


def test_roots_the_sandbox_user_cannot_reach_are_staged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An interpreter under a 0700 dir (/root) is bound onto a staging dir the sandbox user can reach."""
    private = tmp_path / "home"
    (private / "py").mkdir(parents=True)
    private.chmod(0o700)
    monkeypatch.setattr(bwrap, "python_roots", lambda python: [str(private / "py"), "/usr/local/py"])
    binds = bwrap.read_only_binds("python")
    ro, stage = bwrap.staged(binds, (2_100_000_000, 2_100_000_000))
    assert [src for src, _ in stage] == [str(private / "py")]
    point, inside = stage[0][1], dict(binds)[str(private / "py")]
    assert ro == [(point, inside), *binds[1:]]
    assert bwrap.reachable_by_others(point)
    prelude = bwrap.host_prelude((2_100_000_000, 2_100_000_000), [], stage)
    assert prelude[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert "setpriv --reuid=2100000000" in prelude[-2]
