"""The `tora` agent loop in verl (`tora.rl.verl`), against verl's real classes.

verl 0.9 installs and imports on a CPU (`./setup.sh --verl` makes .venv-verl); its
rollout servers (vLLM, SGLang) need a GPU. So the loop is run the way verl's
`AgentLoopWorker` runs it (looked up in verl's registry, built by
`hydra.utils.instantiate` with verl's config wrappers, awaited with a sample's
fields), and its server manager is verl's own `LLMServerClient` with `generate`
served in process by the embedded model (Gemma 3 270M converted to safetensors,
through tora's transformers backend, token ids in and out as verl's servers do)
instead of through Ray to a vLLM replica. Kernels are tora's real sandboxed ones.

Run: .venv-verl/bin/python -m pytest -q -m verl tests/test_rl_verl.py
(skipped where verl is not installed, as in .venv).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from tora.backends.base import Delta, GenerationRequest, checked_stream
from tora.errors import BackendError
from tora.record import ExecutionStep, TextStep, Trajectory

pytestmark = [pytest.mark.verl, pytest.mark.slow, pytest.mark.model]

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")


def converted() -> Path:
    """The tiny embedded model (Gemma 3 270M) as safetensors. verl pins a transformers without GGUF
    dequantisation, so a conversion not yet made is made by the main venv's tora."""
    from tora.backends.convert import convert, embedded_source

    try:
        return convert(embedded_source("embedded-tiny"))
    except BackendError:
        main = ROOT / ".venv" / "bin" / "python"
        if not main.exists():
            pytest.skip("the model is not converted and .venv (with the hf extra) is not there to convert it")
        proc = subprocess.run([str(main), "-m", "tora.cli.main", "models", "convert", "embedded-tiny"],
                              capture_output=True, text=True, env=os.environ.copy(), timeout=900)
        assert proc.returncode == 0, proc.stderr
        return Path(proc.stdout.strip())


def test_the_tora_loop_runs_in_verl_with_exact_tokens_and_mask() -> None:
    pytest.importorskip("verl")
    import hydra
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import (
        AgentLoopOutput,
        DictConfigWrap,
        _agent_loop_registry,
    )
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.replica import TokenOutput

    from tora.backends.transformers import TransformersBackend
    from tora.rl import verl as tora_verl

    hf = converted()
    assert _agent_loop_registry["tora"] == {"_target_": "tora.rl.verl.ToraAgentLoop"}
    config = OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(hf)},
                              "rollout": {"name": "vllm", "prompt_length": 1024, "response_length": 384}},
        "data": {"apply_chat_template_kwargs": {}},
    })
    model = TransformersBackend(hf, device="cpu")

    class EmbeddedServer(LLMServerClient):  # type: ignore[misc]
        """verl's server manager, generating in process instead of on a Ray replica."""

        def __init__(self) -> None:
            super().__init__(config, load_balancer_handle=None)
            self.calls: list[tuple[list[int], list[int], list[float], dict[str, Any]]] = []

        async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                           **kwargs: Any) -> Any:
            params = dict(sampling_params)
            request = GenerationRequest(prompt="", prompt_ids=tuple(prompt_ids), stop=params.pop("stop", []),
                                        max_tokens=params.pop("max_tokens"), temperature=params.pop("temperature"),
                                        top_p=params.pop("top_p"))
            ids: list[int] = []
            logprobs: list[float] = []
            async for event in checked_stream(model, request):
                if isinstance(event, Delta):
                    ids += event.token_ids
                    logprobs += event.logprobs or []
            self.calls.append((list(prompt_ids), ids, logprobs, params))
            return TokenOutput(token_ids=ids, log_probs=logprobs, stop_reason="completed")

    server = EmbeddedServer()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    # The config file users point verl at, loaded as AgentLoopWorker loads it, and the
    # loop built as AgentLoopWorker._run_agent_loop builds one.
    (entry,) = OmegaConf.load(Path(tora_verl.__file__).with_name("verl_agent_loop.yaml"))
    assert entry.name == "tora"
    loop = hydra.utils.instantiate(config=entry, trainer_config=DictConfigWrap(config=config),
                                   server_manager=server, tokenizer=tokenizer, processor=None, hf_model_type="gemma3_text",
                                   dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data))
    assert isinstance(loop, tora_verl.ToraAgentLoop)

    async def go() -> tuple[Any, int, int]:
        try:
            out = await loop.run({"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": True},
                                 raw_prompt=[{"role": "user", "content": NATALIA}], data_source="gsm8k",
                                 reward_model={"ground_truth": "72", "style": "rule"}, extra_info={"index": 7})
            kernels = tora_verl._KERNELS[id(asyncio.get_running_loop())].live
            return out, kernels.live, kernels.peak
        finally:
            await tora_verl.close_worker_kernels()

    out, live, peak = asyncio.run(go())
    assert isinstance(out, AgentLoopOutput)
    t = Trajectory.model_validate(out.extra_fields["tora_trajectory"])
    assert t.problem.id == "gsm8k-7" and t.problem.answer == "72"
    executed = [s for s in t.steps if isinstance(s, ExecutionStep)]
    assert executed, "the model wrote no code block: the mask was not exercised"
    assert live == 0 and peak == 1, "the trajectory's kernel was not given back"

    # The exact sequence: the prompt and response are what the server was last fed plus what it sampled.
    last_prompt, last_ids, _, params = server.calls[-1]
    assert out.prompt_ids + out.response_ids == last_prompt + last_ids
    assert params == {"top_k": -1, "logprobs": True}, "verl's other sampling parameters reach its server"
    # The mask: 1 on every id a server call sampled, 0 on the output blocks between them.
    n = len(out.prompt_ids)
    expect_mask = [0] * len(out.response_ids)
    expect_logprobs = [0.0] * len(out.response_ids)
    for prompt, ids, logprobs, _ in server.calls:
        start = len(prompt) - n
        assert out.response_ids[start : start + len(ids)] == ids
        expect_mask[start : start + len(ids)] = [1] * len(ids)
        expect_logprobs[start : start + len(ids)] = logprobs
    assert out.response_mask == expect_mask
    assert out.response_logprobs == pytest.approx(expect_logprobs)
    spans: list[list[int]] = []
    for i, (token, m) in enumerate(zip(out.response_ids, out.response_mask, strict=True)):
        if m == 0:
            if i == 0 or out.response_mask[i - 1] == 1:
                spans.append([])
            spans[-1].append(token)
    assert [tokenizer.decode(span) for span in spans] == [s.observation for s in executed]
    assert sum(1 for s in t.steps if isinstance(s, TextStep)) == len(server.calls)
    assert out.num_turns == 1 + len(server.calls) + len(executed)
    # The reward is the grader's verdict under the default rule.
    assert t.result.correct is not None and out.reward_score == (1.0 if t.result.correct else 0.0)
