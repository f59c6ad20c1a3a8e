"""Backend kinds: the built-in ones and entry-point plugins, as `tora models` lists them.

The plugins are real entry points: a distribution's metadata written into a
folder on sys.path (and on PYTHONPATH for the command), found by
importlib.metadata as an installed package would be.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TORA, write_released

from tora.backends import kinds as kinds_module
from tora.backends.registry import BUILTIN, kinds, known_kinds, load_backend
from tora.errors import ModelSpecError

PLUGIN = '''
from pathlib import Path

from tora.backends.replay import ReplayBackend


def echo(arg):
    """plays back a file, under another name"""
    return ReplayBackend(Path(arg))


echo.spec_syntax = "echo:FILE"


def plain(arg):
    return ReplayBackend(Path(arg))
'''


def fake_site(root: Path) -> Path:
    """A folder holding an installed distribution `tora-fake-plugins` with three entry points:
    one that works, one without a syntax of its own, one whose module does not import."""
    site = root / "site"
    (site / "tora_fake_plugins-1.0.dist-info").mkdir(parents=True)
    (site / "tora_fake_plugins.py").write_text(PLUGIN)
    (site / "tora_fake_plugins-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tora-fake-plugins\nVersion: 1.0\n")
    (site / "tora_fake_plugins-1.0.dist-info" / "entry_points.txt").write_text(
        "[tora.backends]\necho = tora_fake_plugins:echo\nplain = tora_fake_plugins:plain\n"
        "broken = tora_missing_module:factory\n")
    return site


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = fake_site(tmp_path)
    monkeypatch.syspath_prepend(str(path))
    kinds_module.plugins.cache_clear()
    yield path
    kinds_module.plugins.cache_clear()


def test_every_builtin_kind_is_listed_with_its_syntax() -> None:
    kinds_module.plugins.cache_clear()
    listed = {k.name: k for k in kinds()}
    assert set(BUILTIN) <= set(listed)
    assert listed["openai"].syntax.startswith("openai:") and "protocol" in listed["openai"].about
    assert listed["gguf"].syntax == "gguf:/path/x.gguf" and listed["gguf"].source == "built-in"


def test_plugins_are_listed_a_broken_one_by_name_and_the_others_still_load(site: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = kinds_module.entry_points

    def counted(**kw: str) -> object:
        nonlocal calls
        calls += 1
        return real(**kw)

    monkeypatch.setattr(kinds_module, "entry_points", counted)
    listed = {k.name: k for k in kinds()}
    assert (listed["echo"].syntax, listed["echo"].about, listed["echo"].source, listed["echo"].error) == (
        "echo:FILE", "plays back a file, under another name", "tora-fake-plugins", None)
    assert (listed["plain"].syntax, listed["plain"].about) == ("plain:ARG", "")
    broken = listed["broken"]
    assert broken.error is not None and "tora_missing_module" in broken.error and "ModuleNotFoundError" in broken.error
    assert "echo" in known_kinds() and "broken" not in known_kinds()

    recording = write_released(tmp_path / "r.jsonl", [{"idx": 0, "question": "q", "code": ["$\\boxed{1}$"]}])
    assert load_backend(f"echo:{recording}").name == "replay"
    with pytest.raises(ModelSpecError, match=r"plugin 'broken' \(tora-fake-plugins\) is broken: .*tora_missing_module"):
        load_backend("broken:x")
    kinds()
    assert calls == 1  # read once per process


def test_tora_models_lists_the_kinds_and_survives_a_broken_plugin(site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    proc = subprocess.run([*TORA, "models", "kinds", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert set(BUILTIN) | {"echo", "plain", "broken"} == set(rows)
    assert rows["broken"]["error"] and rows["echo"]["error"] is None
    table = subprocess.run([*TORA, "models"], capture_output=True, text=True, env={**env, "COLUMNS": "250"},
                           timeout=120)
    assert table.returncode == 0, table.stderr
    assert "openai:[MODEL@]http://HOST:PORT/v1?OPTIONS" in table.stdout  # not eaten as markup
    assert "echo:FILE" in table.stdout and "not usable: tora_missing_module:factory failed to load" in table.stdout
