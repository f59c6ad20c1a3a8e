"""Run by path inside the sandbox: ``python -s .../inside/__main__.py kernel|zygote CONFIG_JSON``.

Imports neither the ``sandbox`` package nor pydantic: the package next to
this file is stdlib-only (plus ipykernel, imported where a kernel is built),
and the zygote forks from it.
"""

import importlib
import os
import sys

# Run by path, the script's own dir heads sys.path; its parent makes this
# directory importable as the package ``inside`` (relative imports within).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
importlib.import_module("inside.entry").main(sys.argv)
