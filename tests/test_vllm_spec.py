"""`vllm:` specs: options, and the errors a user meets before any engine starts (no vLLM needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tora.backends.registry import load_backend
from tora.backends.vllm import VllmOptions, parse_spec
from tora.errors import BackendError, ModelSpecError


def test_options_are_parsed_and_typed() -> None:
    target, options = parse_spec("/m/dir?enforce_eager=1&max_model_len=4096&kv_cache_gb=1.5&dtype=float16")
    assert target == "/m/dir"
    assert options == VllmOptions(enforce_eager=True, max_model_len=4096, kv_cache_gb=1.5, dtype="float16")
    assert parse_spec("/m/dir") == ("/m/dir", VllmOptions())


def test_the_embedded_model_gets_llama_cpps_context_and_a_bounded_kv_cache() -> None:
    for spec in ("embedded", "embedded-tiny"):
        _, options = parse_spec(spec)
        assert options.max_model_len == 8192 and options.kv_cache_gb == 2.0
    _, options = parse_spec("embedded?max_model_len=2048&enforce_eager=true")
    assert options.max_model_len == 2048 and options.enforce_eager and options.kv_cache_gb == 2.0


@pytest.mark.parametrize(("spec", "message"), [
    ("/m?eager=1", "unknown option 'eager'"),
    ("/m?max_model_len=big", "max_model_len='big'"),
    ("/m?max_model_len=0", "must be > 0"),
    ("/m?enforce_eager=maybe", "expected 0 or 1"),
    ("/m?enforce_eager", "name=value"),
    ("?enforce_eager=1", "name a model directory"),
])
def test_bad_options_name_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        parse_spec(spec)


def test_a_gguf_file_is_pointed_at_the_conversion(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelSpecError, match="tora models convert"):
        load_backend(f"vllm:{gguf}")


def test_a_directory_without_config_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"no config\.json"):
        load_backend(f"vllm:{tmp_path}")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_error_says_how_to_install_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackendError, match=r"setup\.sh --vllm"):
        load_backend(f"vllm:{tmp_path}")
