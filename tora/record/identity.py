"""Content hashes that say which weights and which tokenizer made a record's tokens.

A file name says nothing (two GGUF quantisations share one), so a model is
named by the sha256 of its bytes: the GGUF file, or for a Hugging Face
directory its safetensors index (or single safetensors file) and tokenizer
files. Hashing a model costs a second or more per GB, so each file's hash (and a
GGUF vocabulary's) is computed once and kept in `$TORA_HOME/cache/file-sha256.json`, keyed by path,
size and mtime: a file that changes gets a new hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from tora.paths import home
from tora.record.schema import ModelId

_LOCK = threading.Lock()
# The files of a Hugging Face directory that decide its tokens: its weights index and tokenizer.
HF_FILES = ("model.safetensors.index.json", "model.safetensors", "config.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _cache_path() -> Path:
    return home() / "cache" / "file-sha256.json"


def _read(cache: Path) -> dict[str, str]:
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def cached_by_file(path: Path, label: str, compute: Callable[[], str]) -> str:
    """`compute()`, a digest of what `path` holds, computed once per version of
    the file: kept under (label, absolute path, size, mtime)."""
    path = Path(path).absolute()
    st = path.stat()
    key = f"{label}:{path}:{st.st_size}:{st.st_mtime_ns}"
    cache = _cache_path()
    with _LOCK:
        if key in (known := _read(cache)):
            return known[key]
    value = compute()
    with _LOCK:
        stale = f"{label}:{path}:"  # older versions of the file
        known = {k: v for k, v in _read(cache).items() if not k.startswith(stale)}
        known[key] = value
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.{threading.get_ident()}.partial")
        partial.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(partial, cache)
    return value


def file_sha256(path: Path) -> str:
    """The sha256 of `path`'s bytes, cached by (absolute path, size, mtime)."""

    def digest() -> str:
        h = hashlib.sha256()
        with Path(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    return cached_by_file(path, "sha256", digest)


def _combined(files: Iterable[Path]) -> tuple[str, list[str]]:
    digest = hashlib.sha256()
    names: list[str] = []
    for f in files:
        digest.update(f"{f.name}\0{file_sha256(f)}\n".encode())
        names.append(f.name)
    return digest.hexdigest(), names


def gguf_identity(path: Path) -> ModelId:
    return ModelId(kind="gguf", sha256=file_sha256(path), files=[Path(path).name])


def hf_identity(directory: Path) -> ModelId:
    """The safetensors index (or the single safetensors file) and the tokenizer files of `directory`."""
    directory = Path(directory)
    present = [directory / name for name in HF_FILES if (directory / name).is_file()]
    weights = any(p.name.startswith("model.safetensors") for p in present)
    sha, names = _combined(present)
    return ModelId(kind="safetensors" if weights else "other", sha256=sha, files=names)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
