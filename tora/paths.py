"""Where tora keeps its state. `TORA_HOME` moves all of it (and isolates tests)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The user data dir: $TORA_HOME, else $XDG_DATA_HOME/tora, else ~/.local/share/tora."""
    if env := os.environ.get("TORA_HOME"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tora"


def models_dir() -> Path:
    return home() / "models"


def trajectories_dir() -> Path:
    """$TORA_HOME/trajectories when TORA_HOME is set; else ./trajectories in a
    checkout of tora (the project's own home for recorded data); else the user
    data dir."""
    if os.environ.get("TORA_HOME"):
        return home() / "trajectories"
    local = Path.cwd() / "trajectories"
    if local.is_dir():
        return local
    return home() / "trajectories"


def history_file() -> Path:
    return home() / "repl_history"
