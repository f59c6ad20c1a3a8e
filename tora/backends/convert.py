"""A GGUF model as a Hugging Face directory, converted once.

vLLM does not load GGUF files, so the embedded Gemma 3 270M (or any GGUF
that transformers reads) is dequantised by transformers into a safetensors
directory (bfloat16 by default: 544 MB for the embedded model, about 100 s on
two cores). It is done once, into `$TORA_HOME/models/<name>-hf/`, and later
runs only read the stamp the conversion leaves in the directory: the source's
sha256 and what produced it. A directory whose stamp names another source is
converted again.

The conversion writes into a temporary sibling and renames it into place, under
a lock, so an interrupted or concurrent conversion never leaves a half-written
model that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tora import embedded_models
from tora.errors import BackendError, ModelSpecError, UsageError
from tora.paths import models_dir

STAMP = "tora-convert.json"
DEFAULT_DTYPE = "bfloat16"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class Source:
    """A GGUF file to convert and its sha256 (known in advance for the embedded model)."""

    path: Path
    sha256: str
    name: str  # what the user called it: "embedded" or the file's name


def embedded_source(spec: str = EMBEDDED) -> Source:
    model = embedded_models.get(spec)
    # model_path() verified the file against this hash when it assembled it.
    return Source(embedded_models.model_path(spec), embedded_models.expected_sha256(model), spec)


def resolve_source(name: str) -> Source:
    """`embedded`, `embedded-tiny`, or a path to a .gguf file (hashed here)."""
    if name in embedded_models.MODELS:
        return embedded_source(name)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UsageError(f"{name}: not one of {', '.join(embedded_models.MODELS)} and not a GGUF file")
    from tora.run_dir import sha256_file

    return Source(path.resolve(), sha256_file(path), path.name)


def default_out(source: Source) -> Path:
    return models_dir() / f"{source.path.name.removesuffix('.gguf')}-hf"


def read_stamp(out: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_converted(out: Path, source: Source, dtype: str = DEFAULT_DTYPE) -> bool:
    stamp = read_stamp(out)
    return (
        stamp is not None
        and stamp.get("source_sha256") == source.sha256
        and stamp.get("dtype") == dtype
        and (out / "config.json").is_file()
        and any(out.glob("*.safetensors"))
    )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    lock = out.with_name(f".{out.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert(source: Source, out: Path | None = None, *, dtype: str = DEFAULT_DTYPE,
            notify: Callable[[str], None] | None = None) -> Path:
    """Convert `source` into `out` (default: beside the embedded model) unless that is done already."""
    out = (out or default_out(source)).expanduser().absolute()
    if is_converted(out, source, dtype):
        return out
    with _locked(out):
        if is_converted(out, source, dtype):  # another process finished it while we waited
            return out
        if out.exists() and read_stamp(out) is None and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"{out} exists and is not a tora conversion; remove it or pick another --out")
        if notify is not None:
            notify(f"converting {source.name} ({source.path.name}) to a Hugging Face directory in {out} "
                   "(once; a few minutes on a small CPU)")
        t0 = time.monotonic()
        # Under the lock no other conversion to `out` runs: what a killed one left is garbage.
        for stale in [*out.parent.glob(f".{out.name}.*.partial"), *out.parent.glob(f".{out.name}.*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            _dequantize(source.path, partial, dtype)
            stamp = {
                "source": source.name,
                "source_file": source.path.name,
                "source_sha256": source.sha256,
                "dtype": dtype,
                "converted_with": _versions(),
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.monotonic() - t0, 1),
            }
            (partial / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            _swap_in(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        if notify is not None:
            notify(f"converted in {time.monotonic() - t0:.0f} s: {out}")
        return out


def _swap_in(partial: Path, out: Path) -> None:
    """Rename `partial` to `out`; a stale conversion there is moved aside first, then removed."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(partial, out)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _dequantize(gguf_file: Path, dest: Path, dtype: str) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise BackendError(
            f"converting a GGUF model needs torch, transformers (with GgufConfig) and gguf ({exc}): "
            "pip install torch==2.13.0 'tora-tir[hf]', or use the vLLM tier (./setup.sh --vllm)"
        ) from exc
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader: say so before a long load
        raise BackendError("converting a GGUF model needs the gguf package: pip install gguf")
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch_dtype, local_files_only=True,
        )
    except Exception as exc:
        raise ModelSpecError(f"{gguf_file}: transformers could not read this GGUF model ({type(exc).__name__}: {exc})") from exc
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for dist in ("transformers", "torch", "gguf", "tora-tir"):
        with contextlib.suppress(PackageNotFoundError):
            found[dist] = version(dist)
    return found
