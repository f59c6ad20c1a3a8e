"""TRL's GRPOTrainer drives tora's loop (`tora.rl.trl.ToraRollout`), for real.

Two GRPO steps of Gemma 3 270M (the embedded model, converted to safetensors by
`tora models convert`, trained in float32 on the CPU), 2 prompts x 2 generations,
each generation a tora trajectory: the trainer's live model samples through the
transformers backend's token path, python blocks run in sandboxed kernels, the
grader's verdict is the reward. Hooks on the trainer's own loss record what it
trained on, and the test checks:

- the loss mask TRL applied (`completion_mask * tool_mask`) is 0 on exactly the
  tokens of the ```output blocks tora appended and 1 on every sampled token, built
  here from the trajectories' steps, not from `rl_row`; at least one block ran;
- every kernel was given back after each rollout, and none is left after `close()`;
- step 2 is on-policy: the logprobs recorded at rollout, after step 1's update, match
  the trainer's recomputation for the same tokens within LOGPROB_TOL (max abs
  difference per token, nats); and, as the control that this check can fail, after
  step 2's update the same tokens' logprobs have moved by more than LOGPROB_TOL.

About 4 minutes on this 2-core machine at load average 5 (13-15 at load 20),
plus the conversion (~100 s), which it shares with the other tests that convert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_models_convert import converted_embedded

from tora.engine import Limits
from tora.export.rl import RewardRule
from tora.record import ExecutionStep, Problem, TextStep, Trajectory

pytestmark = [pytest.mark.slow, pytest.mark.model]
DATA = Path(__file__).parent / "data"

# float32 on both sides; what remains is the difference between an incremental
# decode with a KV cache and one padded forward pass over the whole sequence.
LOGPROB_TOL = 2e-3

PROBLEMS = [
    Problem(id="natalia", text="Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?", answer="72"),
    Problem(id="weng", text="Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
            "babysitting. How much did she earn?", answer="10"),
]


def expected_mask(t: Trajectory, tokenizer: Any) -> tuple[list[int], list[int], int]:
    """(ids, mask, tool tokens) of a trajectory's response, from its steps: sampled ids 1, output blocks 0."""
    ids: list[int] = []
    mask: list[int] = []
    tool = 0
    for step in t.steps:
        if isinstance(step, TextStep):
            assert step.token_ids is not None
            ids += step.token_ids
            mask += [1] * len(step.token_ids)
        elif isinstance(step, ExecutionStep):
            assert step.observation_ids is not None
            assert tokenizer.decode(step.observation_ids) == step.observation  # the block, and only it
            ids += step.observation_ids
            mask += [0] * len(step.observation_ids)
            tool += len(step.observation_ids)
    return ids, mask, tool


def test_two_grpo_steps_train_on_model_tokens_only_and_on_policy(tmp_path: Any) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tora.rl.trl import ToraRollout, tora_reward

    hf = converted_embedded()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)

    def shorter(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        # A tie-breaker, so that a group whose two answers the grader scores alike
        # still has non-zero advantages and step 1 really moves the weights.
        return [-1e-3 * len(ids) for ids in completion_ids]

    # The embedding (262k x 640, tied to the LM head: 170M of the 270M parameters) stays
    # frozen and the prompt is one-shot, so that a step takes about a minute on a CPU.
    model.get_input_embeddings().weight.requires_grad_(False)
    rollout = ToraRollout(PROBLEMS, template=str(DATA / "tora-short.md"),
                          reward=RewardRule(no_answer=-0.5, tool_error=-0.25),
                          limits=Limits(max_tool_calls=2, max_tokens_per_call=48, timeout_s=10.0))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=2,
                      max_completion_length=96, temperature=1.0, learning_rate=1e-4, beta=0.0, seed=0,
                      report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                          train_dataset=Dataset.from_list(rollout.dataset_rows()),
                          reward_funcs=[tora_reward, shorter], rollout_func=rollout)

    steps: list[dict[str, Any]] = []
    compute_loss, per_token_logps = trainer._compute_loss, trainer._get_per_token_logps_and_entropies

    def recording_logps(*a: Any, **kw: Any) -> Any:
        out = per_token_logps(*a, **kw)
        if steps and "logps" not in steps[-1]:
            steps[-1]["logps"] = out[0].detach().clone()
        return out

    def recording_loss(model: Any, inputs: dict[str, Any]) -> Any:
        steps.append({"inputs": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()},
                      "trajectories": [g.trajectory for g in rollout.last],
                      "kernels_live": rollout.kernels_live})
        return compute_loss(model, inputs)

    trainer._compute_loss = recording_loss
    trainer._get_per_token_logps_and_entropies = recording_logps
    try:
        result = trainer.train()
    finally:
        rollout.close()

    assert result.global_step == 2 and len(steps) == 2 and rollout.calls == 2
    tool_tokens = 0
    for step in steps:
        inputs = step["inputs"]
        assert step["kernels_live"] == 0, "a rollout kept a kernel"
        loss_mask = inputs["completion_mask"] * inputs["tool_mask"]
        ids = inputs["completion_ids"]
        assert len(step["trajectories"]) == ids.shape[0] == 4
        model_tokens = 0
        for t in step["trajectories"]:
            want_ids, want_mask, tool = expected_mask(t, tokenizer)
            n = len(want_ids)
            # TRL shuffles the batch: find this trajectory's row by its ids.
            rows = [b for b in range(ids.shape[0]) if int(inputs["completion_mask"][b].sum()) == n
                    and ids[b, :n].tolist() == want_ids]
            assert rows, f"trajectory {t.id}'s tokens are not in the batch the trainer trained on"
            assert loss_mask[rows[0], :n].tolist() == want_mask
            assert int(loss_mask[rows[0], n:].sum()) == 0
            tool_tokens += tool
            model_tokens += n - tool
        # The loss is normalised by the tokens it covers: the model's, not the tool's.
        assert int(inputs["num_items_in_batch"]) == model_tokens
    assert tool_tokens > 0, "no python block ran in 8 trajectories: the mask was not exercised"
    assert rollout.kernels_peak >= 1 and rollout.kernels_live == 0

    # Step 2: the rollout's logprobs (recorded while sampling, after step 1's update)
    # against the trainer's recomputation in its loss, on the tokens the loss covers.
    second = steps[1]["inputs"]
    mask = (second["completion_mask"] * second["tool_mask"]).bool()
    recorded = second["sampling_per_token_logps"][mask]
    recomputed = steps[1]["logps"][mask]
    gap = float((recorded - recomputed).abs().max())
    assert gap <= LOGPROB_TOL, f"rollout logprobs are off-policy by up to {gap:.4f} nats"

    # Control: one more update moves the same tokens' logprobs past the tolerance, so
    # a rollout one step stale would have failed the check above.
    input_ids = torch.cat([second["prompt_ids"], second["completion_ids"]], dim=1)
    attention = torch.cat([second["prompt_mask"], second["completion_mask"]], dim=1)
    with torch.no_grad():
        after, _, _ = per_token_logps(trainer.model, input_ids, attention, second["completion_ids"].shape[1])
    moved = float((after[mask] - recomputed).abs().max())
    assert moved > LOGPROB_TOL, f"an update moved logprobs by only {moved:.5f}: the on-policy check proves nothing"
