"""`tora lm-eval ARGS...`: lm-evaluation-harness's own CLI, with tora's model and tasks.

It imports tora.lmeval.model (which registers the `tora` model: lm-eval
sees a custom model only once its module is imported), adds tora's task
folder (tora_gsm8k, tora_math500) to the task search path unless
`--include_path` is given, defaults to offline datasets (tora's tasks read
local files), and hands every argument to lm-eval unchanged: its flags, its
output, its exit code. `--model tora` is the default.

    tora lm-eval --model_args model=embedded,concurrency=4 --tasks tora_gsm8k --limit 20
    tora lm-eval --model local-completions --tasks tora_gsm8k \\
        --model_args base_url=http://127.0.0.1:8000/v1/completions,model=tora,tokenizer_backend=None,tokenized_requests=False
"""

from __future__ import annotations

import os
import sys

import click

from tora.errors import UsageError


def lm_eval_argv(args: list[str], tasks_dir: str) -> list[str]:
    """lm-eval's argv for ours: `--model tora` and tora's tasks unless they are named otherwise."""
    argv = list(args)
    if argv and argv[0] in ("ls", "validate", "run"):
        command, argv = [argv[0]], argv[1:]
    else:
        command = ["run"]
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if command == ["run"] and "--model" not in given and not {"-h", "--help"} & set(argv):
        argv = ["--model", "tora", *argv]
    if "--include_path" not in given:
        argv += ["--include_path", tasks_dir]
    return ["lm-eval", *command, *argv]


@click.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                            "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval(args: tuple[str, ...]) -> int:
    """Run lm-evaluation-harness with the tora model and tasks (all arguments go to lm-eval; try --help)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as exc:
        raise UsageError("tora lm-eval needs lm-evaluation-harness: pip install 'tora-tir[lmeval]'") from exc
    import tora.lmeval.model  # noqa: F401 - registers the `tora` model
    from tora.lmeval import TASKS_DIR

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.argv = lm_eval_argv(list(args), str(TASKS_DIR))
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse and lm-eval exit through here; keep their code
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
