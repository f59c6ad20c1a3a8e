"""lm-evaluation-harness glue (the `lmeval` extra).

model.py   the `tora` model (registered when imported)
docs.py    what the task files call: the documents (tora's own loaders) and their scoring (Math-Verify)
tasks/     task files: tora_gsm8k, tora_math500 (`tora lm-eval` adds this folder to lm-eval's search path)

Nothing here imports lm_eval at package import, so `tora` works without the extra.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
