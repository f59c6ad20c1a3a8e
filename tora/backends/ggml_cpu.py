"""Choosing the llama.cpp CPU backend that runs on this machine.

`setup.sh` builds llama-cpp-python with ggml's runtime dispatch
(GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, GGML_NATIVE off): one build holds a
CPU backend module per x86 feature level (`libggml-cpu-haswell.so`,
`-skylakex`, `-icelake`, `-sapphirerapids`, ...), so the same wheel runs on
any x86-64 machine at the speed its CPU allows.

ggml's own loader takes the module with the highest cpuid score, and cpuid
is not proof: on a VM whose CPU reports AMX, the AMX module faulted on its
first `tilezero` (SIGILL) and took the whole process down. So tora never
trusts a score alone. Candidates are tried best score first, each in a child
process that loads a real model and generates a few tokens; the first that
survives is used, and the verdict is cached per CPU and per build under
`$TORA_HOME/cache/`. A crash costs a child process, never the runtime.

Builds without variant modules (a plain `pip install llama-cpp-python`) have
their CPU backend linked in; `check()` still proves they run before setup
says "ready".
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tora.errors import BackendError
from tora.paths import home

ENV_FORCE = "TORA_GGML_CPU"  # e.g. TORA_GGML_CPU=haswell: use that variant, skip the probe
PROBE_TIMEOUT_S = 120.0
REBUILD_HINT = "rebuild it portably with `./setup.sh --rebuild-engine`"


@dataclass(frozen=True)
class Probe:
    """What one child process found for one variant (or for a build without variants)."""

    variant: str  # "haswell", ...; "builtin" for a build without variant modules
    path: str | None
    score: int
    ok: bool
    detail: str  # "41.2 tok/s" or why it failed ("killed by SIGILL (illegal instruction)")
    tok_s: float = 0.0


def lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def variants() -> dict[str, Path]:
    """The CPU backend modules of this build, by variant name (empty: CPU backend built in)."""
    return {p.name.removeprefix("libggml-cpu-").removesuffix(".so"): p for p in sorted(lib_dir().glob("libggml-cpu-*.so"))}


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "vendor_id"))]
    return "\n".join(sorted(set(keep)))


def _cache_key() -> str:
    import llama_cpp

    parts = [_cpu_identity(), llama_cpp.__version__, str(lib_dir())]
    for path in sorted(lib_dir().glob("*.so")):
        st = path.stat()
        parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cache_path() -> Path:
    return home() / "cache" / "ggml-cpu.json"


def _describe_exit(code: int) -> str:
    if code < 0:
        sig = signal.Signals(-code)
        meaning = {signal.SIGILL: "illegal instruction", signal.SIGSEGV: "segmentation fault",
                   signal.SIGBUS: "bus error", signal.SIGABRT: "aborted"}.get(sig, "signal")
        return f"killed by {sig.name} ({meaning})"
    return f"exit code {code}"


def _probe(variant: str, path: Path | None, score: int, model: Path) -> Probe:
    """Load the model with this variant and generate, in a child process."""
    argv = [sys.executable, "-m", "tora.backends.ggml_cpu", "_generate", str(model), str(path or "")]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, env={**os.environ, ENV_FORCE: ""})
    except subprocess.TimeoutExpired:
        return Probe(variant, str(path) if path else None, score, False, f"no answer in {PROBE_TIMEOUT_S:g} s")
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        why = _describe_exit(proc.returncode) + (f": {tail[0]}" if tail and proc.returncode > 0 else "")
        return Probe(variant, str(path) if path else None, score, False, why)
    tok_s = float(json.loads(proc.stdout.decode().strip().splitlines()[-1])["tok_s"])
    return Probe(variant, str(path) if path else None, score, True, f"{tok_s:.1f} tok/s", tok_s)


def _scores(found: dict[str, Path]) -> dict[str, int]:
    """cpuid scores of every variant (0: this CPU lacks a feature it needs), read in a child process.

    ggml computes them in process; a child keeps even that away from the
    runtime, since each module's code is compiled for its own feature level.
    """
    argv = [sys.executable, "-m", "tora.backends.ggml_cpu", "_scores", *map(str, found.values())]
    proc = subprocess.run(argv, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise BackendError(f"reading the llama.cpp CPU variants' scores failed ({_describe_exit(proc.returncode)}); "
                           f"{REBUILD_HINT}")
    by_path: dict[str, int] = json.loads(proc.stdout)
    return {name: by_path[str(path)] for name, path in found.items()}


def probe_model() -> Path:
    """What the probes load: the tiny embedded model (small, quick to load, always installed),
    whatever model is asked for."""
    from tora import embedded_models

    return embedded_models.model_path(embedded_models.TINY)


def probe_all(*, stop_at_first: bool = True) -> list[Probe]:
    """Probe variants best score first; with `stop_at_first`, until one runs."""
    model = probe_model()
    found = variants()
    if not found:
        return [_probe("builtin", None, 0, model)]
    scores = _scores(found)
    results: list[Probe] = []
    for name in sorted(found, key=lambda n: -scores[n]):
        if scores[name] <= 0:
            results.append(Probe(name, str(found[name]), 0, False, "this CPU lacks a feature it needs (cpuid)"))
            continue
        result = _probe(name, found[name], scores[name], model)
        results.append(result)
        if result.ok and stop_at_first:
            break
    return results


def choose() -> Probe:
    """The variant to use here: from the cache, else probed (and cached)."""
    key = _cache_key()
    cache = _cache_path()
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return Probe(**saved["choice"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    results = probe_all()
    working = [r for r in results if r.ok]
    if not working:
        tried = "; ".join(f"{r.variant}: {r.detail}" for r in results)
        raise BackendError(f"no llama.cpp CPU backend runs on this machine ({tried}); {REBUILD_HINT}")
    choice = working[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "choice": asdict(choice), "tried": [asdict(r) for r in results]}))
    os.replace(tmp, cache)
    return choice


_loaded: str | None = None


def _load_module(path: Path) -> None:
    # By soname: the wheel holds libggml.so and libggml.so.0 as two copies
    # (wheels have no symlinks), and only the one libllama linked has the
    # registry llama.cpp reads.
    import llama_cpp  # noqa: F401 - loads libllama and with it libggml.so.0

    libggml = ctypes.CDLL("libggml.so.0")
    libggml.ggml_backend_load.restype = ctypes.c_void_p
    libggml.ggml_backend_load.argtypes = (ctypes.c_char_p,)
    if not libggml.ggml_backend_load(str(path).encode()):
        raise BackendError(f"llama.cpp could not load its CPU backend {path}; {REBUILD_HINT}")


def ensure_cpu_backend() -> str:
    """Register the CPU backend that runs here, before llama.cpp looks for one.

    Returns the variant's name ("builtin" for a build without variants). Must
    run before the first `Llama(...)`: with no backend registered, llama.cpp
    would load the best-scoring module itself, unchecked.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    found = variants()
    if not found:
        _loaded = "builtin"
        return _loaded
    forced = os.environ.get(ENV_FORCE, "").strip()
    if forced:
        if forced not in found:
            raise BackendError(f"{ENV_FORCE}={forced}: no such llama.cpp CPU variant; built: {', '.join(found)}")
        name = forced
    else:
        name = choose().variant
    _load_module(found[name])
    _loaded = name
    return name


def check() -> Probe:
    """Prove the engine runs here (setup.sh's last step); BackendError with the fix if nothing does."""
    if variants():
        return choose()
    result = _probe("builtin", None, 0, probe_model())
    if not result.ok:
        raise BackendError(f"the llama.cpp engine {result.detail} on this CPU; {REBUILD_HINT}")
    return result


# --- the child processes ----------------------------------------------------------


def _child_scores(paths: list[str]) -> None:
    out: dict[str, int] = {}
    for path in paths:
        lib = ctypes.CDLL(path)
        score = getattr(lib, "ggml_backend_score", None)
        out[path] = int(score()) if score is not None else 0
    sys.stdout.write(json.dumps(out))


def _child_generate(model: str, variant_path: str) -> None:
    import llama_cpp

    if variant_path:
        _load_module(Path(variant_path))

    @llama_cpp.llama_log_callback  # type: ignore[misc, untyped-decorator]
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    from tora.backends import cpu_threads

    # As many threads as idle cores: more, on a busy machine, made the probe itself crawl (cpu_threads).
    threads = cpu_threads.now()
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    # A prompt of several tokens exercises the batched matrix kernels (where
    # the AMX fault was), the decode the single-token ones.
    prompt = "Question: what is 12 times 7? Show the computation step by step, then the answer.\nAnswer:"
    llm.create_completion(prompt, max_tokens=1, temperature=0.0)
    t0 = time.perf_counter()
    out: Any = llm.create_completion(prompt + " 12", max_tokens=16, temperature=0.0)
    n = max(1, int(out["usage"]["completion_tokens"]))
    sys.stdout.write(json.dumps({"tok_s": n / (time.perf_counter() - t0)}) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["_scores"]:
        _child_scores(argv[1:])
        return 0
    if argv[:1] == ["_generate"]:
        _child_generate(argv[1], argv[2])
        return 0
    if argv[:1] == ["check"]:
        try:
            result = check()
        except BackendError as exc:
            sys.stderr.write(f"engine check failed: {exc}\n")
            return 1
        sys.stderr.write(f"engine: llama.cpp, CPU backend {result.variant}, {result.detail}\n")
        return 0
    sys.stderr.write("usage: python -m tora.backends.ggml_cpu check\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
