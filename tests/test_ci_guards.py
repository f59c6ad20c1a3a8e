"""CI cannot hide a missing protection: under TORA_REQUIRE_TIER a protection's skip is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = '''
from conftest import needs_protection, skip_without_protection

@needs_protection(True, "a protection this machine lacks")
def test_marked():
    pass

def test_decided_inside():
    skip_without_protection("another one")

@needs_protection(False, "present")
def test_present():
    pass
'''


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    environ = {k: v for k, v in os.environ.items() if k != "TORA_REQUIRE_TIER"}
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), environ.get("PYTHONPATH", "")])
    # -p conftest: the suite's conftest as a plugin, so its report hook applies to the probe.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider",
                           str(probe)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**environ, **env})


def test_a_missing_protection_skips_with_its_reason(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout
    assert "protection missing here: a protection this machine lacks" in proc.stdout  # -rs: the reason shows


def test_under_tora_require_tier_it_fails(tmp_path: Path) -> None:
    proc = _run(tmp_path, TORA_REQUIRE_TIER="bwrap")
    assert proc.returncode == 1, proc.stdout
    # A skip decided at set-up (a mark) reports as an error, one decided in the test as a failure.
    assert "1 failed, 1 passed, 1 error" in proc.stdout
    assert "TORA_REQUIRE_TIER=bwrap: this protection must be tested here" in proc.stdout
