"""A verb's result for scripts: `--json` prints it as one JSON line on stdout, and nothing else goes there."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
