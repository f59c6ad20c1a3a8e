"""What a request puts into a fresh kernel before its code, and takes out after.

The kernel's work dir is a tmpfs of its own mount namespace, invisible from the
host, so files go in and out through the kernel itself: one cell before the
code (files written, stdin set up) and one after (files read back as base64).
The helper cells leave no names in the user's namespace.
"""

from __future__ import annotations

import json

from sandbox.result import CellResult


def setup_cell(files: dict[str, str | None], stdin: str | None) -> str | None:
    """A cell writing ``files`` (path -> base64) under the work dir and making ``stdin`` the kernel's stdin.

    ``input()`` reads from it as a script's would (EOFError at its end); in a
    kernel it would otherwise ask the client, which cannot answer.
    """
    wanted = {path: data for path, data in files.items() if data is not None}
    if not wanted and stdin is None:
        return None
    return (
        "def __tora_setup(files, stdin):\n"
        "    import base64, io, os, sys\n"
        "    for path, data in files.items():\n"
        "        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)\n"
        "        with open(path, 'wb') as f:\n"
        "            f.write(base64.b64decode(data))\n"
        "    if stdin is not None:\n"
        "        sys.stdin = io.StringIO(stdin)\n"
        "        def read_line(prompt=''):\n"
        "            sys.stdout.write(str(prompt))\n"
        "            line = sys.stdin.readline()\n"
        "            if not line:\n"
        "                raise EOFError('EOF when reading a line')\n"
        "            return line.rstrip('\\n')\n"
        "        get_ipython().kernel.raw_input = read_line\n"
        f"__tora_setup({wanted!r}, {stdin!r})\n"
        "del __tora_setup\n"
    )


def fetch_cell(paths: list[str]) -> str:
    """A cell printing one JSON object: path -> base64 content, for each of ``paths`` that is a file."""
    return (
        "print(__import__('json').dumps({p: __import__('base64').b64encode(open(p, 'rb').read()).decode() "
        f"for p in {paths!r} if __import__('os').path.isfile(p)}}))\n"
    )


def fetched(result: CellResult, paths: list[str]) -> tuple[dict[str, str], str]:
    """The files the fetch cell read, and a note if some could not be brought back."""
    if result.status != "ok" or result.truncated:
        why = "over the output limit" if result.truncated else (result.error.evalue if result.error else result.status)
        return {}, f"fetch_files: the files could not be read back ({why})"
    try:
        found = json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}, "fetch_files: the files could not be read back (the code replaced the kernel's output)"
    if not isinstance(found, dict):
        return {}, "fetch_files: the files could not be read back"
    files = {p: v for p, v in found.items() if p in paths and isinstance(v, str)}
    return files, ""
