"""Interpreters under /tmp (a CI checkout, say) stay visible in the sandbox,
whose private /tmp would otherwise hide them."""

from __future__ import annotations

import pytest

from sandbox import bwrap


def test_roots_under_tmp_are_mapped_and_the_interpreter_path_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bwrap, "python_roots", lambda python: ["/opt/py311", "/tmp/ci/clone/.venv"])
    assert bwrap.python_mounts("x") == [("/opt/py311", "/opt/py311"), ("/tmp/ci/clone/.venv", "/sandbox/py1")]
    assert bwrap.sandbox_python("/tmp/ci/clone/.venv/bin/python") == "/sandbox/py1/bin/python"
    assert bwrap.sandbox_python("/opt/py311/bin/python3") == "/opt/py311/bin/python3"


def test_the_bwrap_command_binds_mapped_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    from sandbox import SandboxPolicy

    monkeypatch.setattr(bwrap, "python_roots", lambda python: ["/tmp/ci/.venv"])
    argv = bwrap.bwrap_argv(SandboxPolicy(), Path("/r"), Path("/w"), Path("/lib/inside.py"), "/tmp/ci/.venv/bin/python", {})
    i = argv.index("/tmp/ci/.venv")
    assert argv[i - 1] == "--ro-bind" and argv[i + 1] == "/sandbox/py0"
