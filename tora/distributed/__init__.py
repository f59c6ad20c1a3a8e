"""Batch verbs on a Ray cluster: problems sharded across workers, records in shards, merged.

- `plan`: what a verb does per problem (`ProblemPlan`; `EvalPlan` for `tora eval`);
- `worker`: one worker, a Ray actor with its own event loop, scheduler, kernel pool and model client;
- `driver`: leases problems to workers, replaces lost ones, merges (`run_on_cluster`);
- `shards` and `leases`: the run folder's shard files, their merge, and the lease log;
- `cluster`: connecting to a cluster, or starting a private one on loopback;
- `progress`: the driver's per-node table;
- `simulate`: stand-ins for GPU endpoints and kernels, for capacity planning and benchmarks.

Nothing here imports Ray until a cluster is used: `pip install 'tora-tir[ray]'`.
"""
