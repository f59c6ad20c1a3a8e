"""kill -9 of `tora curate` at random moments, then resume: what is lost, doubled or corrupt.

    .venv/bin/python benchmarks/bench_resume.py [--trials 10] [--kills 2] [--problems 16] [--samples 3]

First one uninterrupted reference run. Then each trial starts the same
command in a fresh folder, kills its whole process group (the CLI and its
kernels) with SIGKILL at a random moment of a run's length, `--kills` times,
running the same command again after each kill, and finally lets it finish.
Before each restart it notes every complete record on disk.

Counted per trial (goal 0 / 0 / 0): records lost (a record complete on disk at
some kill that is not in the final files), duplicated (a (problem, sample)
twice in trajectories.jsonl, an id or content hash twice in curated.jsonl)
and corrupt (a line of either file that does not read as a record). Also
checked: the final curated.jsonl keeps exactly what the reference run kept
(the replayed model is deterministic and the choice is seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced import load_average

TORA = [sys.executable, "-m", "tora.cli.main"]


def fixture(tmp: Path, problems: int, samples: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    data = tmp / "set.jsonl"
    rows = []
    with data.open("w") as f:
        for i in range(problems):
            f.write(json.dumps({"id": f"p{i}", "question": f"Resume problem {i}?", "answer": str(i)}) + "\n")
    for i in range(problems):
        outs = []
        for k in range(samples):
            value = i if rng.random() < 0.6 else i + 1  # some wrong
            pause = rng.uniform(0.05, 0.4)
            # Two correct samples of a problem may be identical: dedupe has work to do.
            tag = rng.choice(["", f"  # take {k}"])
            outs.append(f"```python\nimport time\ntime.sleep({pause:.2f})\nprint({value}){tag}\n```\n"
                        f"```output\n{value}\n```\nSo $\\boxed{{{value}}}$.")
        rows.append({"idx": f"p{i}", "question": f"Resume problem {i}?", "code": outs})
    released = tmp / "samples.jsonl"
    with released.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return data, released


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def complete_ids(path: Path) -> set[str]:
    out = set()
    for line in lines(path):
        try:
            out.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            continue
    return out


def strict(path: Path) -> tuple[list[dict[str, object]], int]:
    rows, bad = [], 0
    for line in lines(path):
        try:
            row = json.loads(line)
            assert isinstance(row, dict) and "id" in row
            rows.append(row)
        except (ValueError, AssertionError):
            bad += 1
    return rows, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    data, released = fixture(tmp, args.problems, args.samples, args.seed)
    env = {**os.environ, "TORA_DATA_DIR": str(tmp / "no-eval-sets")}  # the guard has nothing to check here

    def command(out: Path) -> list[str]:
        return [*TORA, "curate", str(data), "--model", f"replay:{released}", "--samples", str(args.samples),
                "-M", "2", "--concurrency", "4", "--out", str(out)]

    print(f"resume: {args.trials} trials x {args.kills} kills, {args.problems} problems x {args.samples} samples; "
          f"{load_average()}", flush=True)
    t0 = time.monotonic()
    reference = tmp / "reference"
    subprocess.run(command(reference), env=env, check=True, capture_output=True)
    full = time.monotonic() - t0
    expected = sorted((r["problem"]["id"], r["sample_index"])  # type: ignore[index]
                      for r in strict(reference / "curated.jsonl")[0])
    print(f"reference run {full:.1f} s, {len(expected)} kept", flush=True)
    rng = random.Random(args.seed)
    totals = {"lost": 0, "duplicated": 0, "corrupt": 0, "mismatch": 0}
    for trial in range(args.trials):
        out = tmp / f"trial{trial}"
        seen: set[str] = set()
        moments = []
        for _ in range(args.kills):
            proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            moment = rng.uniform(0.3, full)
            try:
                proc.wait(timeout=moment)
                moments.append(f"{moment:.1f} s (finished first)")
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                moments.append(f"{moment:.1f} s ({len(complete_ids(out / 'trajectories.jsonl'))} records)")
            seen |= complete_ids(out / "trajectories.jsonl") | complete_ids(out / "curated.jsonl")
        subprocess.run(command(out), env=env, check=True, capture_output=True)
        recs, bad_t = strict(out / "trajectories.jsonl")
        kept, bad_c = strict(out / "curated.jsonl")
        final = {str(r["id"]) for r in recs} | {str(r["id"]) for r in kept}
        pairs = [(r["problem"]["id"], r["sample_index"]) for r in recs]  # type: ignore[index]
        lost = len(seen - final)
        duplicated = (len(pairs) - len(set(pairs)) + len(kept) - len({r["id"] for r in kept})
                      + len(kept) - len({r["content_hash"] for r in kept}))
        corrupt = bad_t + bad_c
        got = sorted((r["problem"]["id"], r["sample_index"]) for r in kept)  # type: ignore[index]
        mismatch = int(got != expected)
        torn = sum(1 for name in ("trajectories.jsonl.torn", "curated.jsonl.torn") if (out / name).exists())
        for key, value in (("lost", lost), ("duplicated", duplicated), ("corrupt", corrupt), ("mismatch", mismatch)):
            totals[key] += value
        print(f"  trial {trial + 1:2}: kills at {', '.join(moments)}; {len(recs)} records, "
              f"{len(kept)} kept; lost {lost} duplicated {duplicated} corrupt {corrupt}; "
              f"selection {'same' if not mismatch else 'DIFFERENT'}; torn lines moved aside: {torn}", flush=True)
    print(f"records lost / duplicated / corrupt: {totals['lost']} / {totals['duplicated']} / {totals['corrupt']} "
          f"(goal 0 / 0 / 0); curated set different from the reference in {totals['mismatch']} of {args.trials} trials")
    print(load_average())


if __name__ == "__main__":
    main()
