"""The embedded models through llama.cpp (`embedded`, `embedded-tiny`).

What each model is and where its file comes from lives in
tora/embedded_models.py, which imports no backend.
"""

from __future__ import annotations

from pathlib import Path

from tora import embedded_models
from tora.backends.llamacpp import LlamaCppBackend


def embedded_model_path(spec: str = embedded_models.DEFAULT) -> Path:
    return embedded_models.model_path(spec)


def load_embedded(spec: str = embedded_models.DEFAULT) -> LlamaCppBackend:
    model = embedded_models.get(spec)
    backend = LlamaCppBackend(embedded_models.model_path(spec))
    backend.model = model.label
    return backend
