"""A GRPO group that branches after its first cell (`ToraRollout(branch_after_cell=1)`): Gemma 3
270M (the embedded model, converted to safetensors) generates through the transformers backend's
token path, the group's first generation's prefix is shared, and the others continue from its
exact ids in forks of its kernel. The rollout is called as TRL calls it (test_rl_trl.py runs the
real GRPOTrainer around it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_models_convert import converted_embedded
from test_tokens import NATALIA

from tora.engine import Limits
from tora.export.rl import rl_row
from tora.record import Problem

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_a_group_shares_its_first_generations_prefix_and_forks_its_kernel() -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tora.rl.trl import ToraRollout

    hf = converted_embedded()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    # What the rollout reads of TRL's trainer; greedy, so the first generation's cell is certain.
    trainer = SimpleNamespace(model=model, processing_class=tokenizer, temperature=0.0, top_p=1.0,
                              max_completion_length=200, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    rollout = ToraRollout([Problem(id="natalia", text=NATALIA, answer="72")], template="tora-gsm8k",
                          limits=Limits(max_tool_calls=2, max_tokens_per_call=120, timeout_s=10.0),
                          branch_after_cell=1)
    try:
        out = rollout([NATALIA] * 3, trainer)
        assert rollout.kernels_live == 0
    finally:
        rollout.close()
    leader, *others = [g.trajectory for g in rollout.last]
    assert leader.shared_prefix is not None, leader.completion()  # it ran a cell
    n = leader.shared_prefix.steps
    shared = rl_row(leader.model_copy(update={"steps": leader.steps[:n]}))
    assert shared is not None
    for t, completion in zip(others, out["completion_ids"][1:], strict=True):
        assert t.shared_prefix == leader.shared_prefix and t.steps[:n] == leader.steps[:n]
        assert t.kernel_state is not None and t.kernel_state.method == "fork"
        assert t.generation.token_path == "tokens" and t.prompt_ids == leader.prompt_ids
        # What the trainer gets: the shared prefix's ids, then the generation's own.
        assert completion[: len(shared.response_ids)] == shared.response_ids
        assert len(completion) > len(shared.response_ids)
