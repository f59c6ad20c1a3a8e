"""Choosing the llama.cpp CPU variant: a variant that dies is passed over, never used.

The crash is real: a CPU backend module, compiled here, whose registration
function raises SIGILL (what the AMX module did on a machine whose cpuid
claimed AMX), offered with the best cpuid score next to the build's real
variants. The probe must run it in a child, see the signal, and pick the
next one, which really generates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tora.backends import ggml_cpu
from tora.errors import BackendError

pytestmark = pytest.mark.skipif(not ggml_cpu.variants(), reason="this llama.cpp build has its CPU backend built in "
                                "(setup.sh builds one module per CPU level)")

EVIL = r"""
#include <signal.h>
/* The highest score of any module: ggml's own loader would take this one. */
int ggml_backend_score(void) { return 1 << 30; }
/* Registration: where ggml first runs a module's code. */
void *ggml_backend_init(void) { raise(SIGILL); return 0; }
"""


@pytest.fixture
def evil_variant(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the crashing module")
    src = tmp_path / "evil.c"
    src.write_text(EVIL)
    lib = tmp_path / "libggml-cpu-evil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's verdict cache, not the session's shared one."""
    cache = tmp_path / "cache" / "ggml-cpu.json"
    monkeypatch.setattr(ggml_cpu, "_cache_path", lambda: cache)
    return cache


def test_a_variant_that_dies_on_sigill_is_reported_and_passed_over(
        evil_variant: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ggml_cpu.variants()
    monkeypatch.setattr(ggml_cpu, "variants", lambda: {"evil": evil_variant, **real})

    choice = ggml_cpu.choose()

    assert choice.ok and choice.variant in real and choice.variant != "evil"
    assert choice.tok_s > 1.0  # the chosen one really generated
    saved = json.loads(own_cache.read_text())
    tried = {t["variant"]: t for t in saved["tried"]}
    # Tried first (best score), died on the signal, said so; the runtime (this process) lives on.
    assert next(iter(tried)) == "evil"
    assert tried["evil"]["ok"] is False and tried["evil"]["detail"] == "killed by SIGILL (illegal instruction)"
    assert saved["choice"]["variant"] == choice.variant

    # The verdict is cached: asked again, nothing is probed.
    def no_probe(*args: object) -> None:
        raise AssertionError("probed again despite a cached verdict")

    monkeypatch.setattr(ggml_cpu, "_probe", no_probe)
    assert ggml_cpu.choose() == choice


def test_when_every_variant_dies_the_error_says_what_each_did_and_the_fix(
        evil_variant: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ggml_cpu, "variants", lambda: {"evil": evil_variant})
    with pytest.raises(BackendError) as caught:
        ggml_cpu.choose()
    message = str(caught.value)
    assert "evil: killed by SIGILL (illegal instruction)" in message and "./setup.sh --rebuild-engine" in message
    assert not own_cache.exists()  # no verdict is cached when nothing runs


def test_setup_check_proves_the_engine_in_a_child_and_names_the_variant() -> None:
    proc = subprocess.run([sys.executable, "-m", "tora.backends.ggml_cpu", "check"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    variant = line.removeprefix("engine: llama.cpp, CPU backend ").split(",")[0]
    assert variant in ggml_cpu.variants() and line.endswith("tok/s"), line


def test_a_forced_variant_that_is_not_built_is_a_clear_error() -> None:
    code = "from tora.backends.ggml_cpu import ensure_cpu_backend; ensure_cpu_backend()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, ggml_cpu.ENV_FORCE: "pentium2"})
    assert proc.returncode != 0
    assert "TORA_GGML_CPU=pentium2: no such llama.cpp CPU variant; built: " in proc.stderr
    assert "x64" in proc.stderr.splitlines()[-1]
