"""tora as the rollout engine of an RL trainer.

- `tora.rl.trl`: a `rollout_func` for TRL's `GRPOTrainer` that runs tora episodes with the
  trainer's live model (`tora.rl.live`), stateful sandboxed kernels and the grader as reward.
- `tora.rl.verl`: an agent loop registered in verl as `tora` (imports verl; install it apart).

Both turn a finished trajectory into token ids, the loss mask and the sampler's logprobs
through one function, `tora.export.rl.rl_row`, the same one `tora export --format rl` uses.
"""
